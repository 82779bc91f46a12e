"""The private transformer: layers mirroring mpcache/model/transformer.py on secret shares (`layers`) and the
private decoder (`decoder`)."""
