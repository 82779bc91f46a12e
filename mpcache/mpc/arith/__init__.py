"""Fixed-point arithmetic on secret shares: CrypTen shims, ring math shared with the dealer (`ring`), range-aware
numerics that run on shares or on floats (`numerics`), the append-only secret operand (`append_only`), calibrated
attention-score bounds and cost accounting."""
