from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]

class Op(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OP_UNSPECIFIED: _ClassVar[Op]
    OP_SEND: _ClassVar[Op]
    OP_ALL_REDUCE: _ClassVar[Op]
    OP_REDUCE: _ClassVar[Op]
    OP_BROADCAST: _ClassVar[Op]
    OP_GATHER: _ClassVar[Op]
    OP_ALL_GATHER: _ClassVar[Op]
    OP_SCATTER: _ClassVar[Op]
    OP_BARRIER: _ClassVar[Op]
    OP_SEND_OBJ: _ClassVar[Op]
    OP_BROADCAST_OBJ: _ClassVar[Op]
    OP_ABORT: _ClassVar[Op]
    OP_CLOSE: _ClassVar[Op]
    OP_OPEN: _ClassVar[Op]
    OP_JOB_BEGIN: _ClassVar[Op]
    OP_JOB_CHECK: _ClassVar[Op]
    OP_JOB_END: _ClassVar[Op]
    OP_JOB_ABORT: _ClassVar[Op]

class ReduceOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCE_OP_UNSPECIFIED: _ClassVar[ReduceOp]
    SUM: _ClassVar[ReduceOp]
    PRODUCT: _ClassVar[ReduceOp]
    MIN: _ClassVar[ReduceOp]
    MAX: _ClassVar[ReduceOp]
    BAND: _ClassVar[ReduceOp]
    BOR: _ClassVar[ReduceOp]
    BXOR: _ClassVar[ReduceOp]

class TupleKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TUPLE_KIND_UNSPECIFIED: _ClassVar[TupleKind]
    BEAVER_MUL: _ClassVar[TupleKind]
    BEAVER_MATMUL: _ClassVar[TupleKind]
    BEAVER_CONV1D: _ClassVar[TupleKind]
    BEAVER_CONV2D: _ClassVar[TupleKind]
    BEAVER_CONV_TRANSPOSE1D: _ClassVar[TupleKind]
    BEAVER_CONV_TRANSPOSE2D: _ClassVar[TupleKind]
    SQUARE: _ClassVar[TupleKind]
    BINARY_AND: _ClassVar[TupleKind]
    B2A_BIT: _ClassVar[TupleKind]
    TRUNCATION_PAIR: _ClassVar[TupleKind]
    EXACT_TRUNCATION: _ClassVar[TupleKind]
    FIXED_MASK: _ClassVar[TupleKind]
    FIXED_MUL: _ClassVar[TupleKind]
    FIXED_MATMUL: _ClassVar[TupleKind]
    FIXED_MATMUL_T: _ClassVar[TupleKind]
    FSS_COMPARE: _ClassVar[TupleKind]
    FSS_LUT: _ClassVar[TupleKind]

class ShareEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SHARE_ENCODING_UNSPECIFIED: _ClassVar[ShareEncoding]
    TOKEN_IDS: _ClassVar[ShareEncoding]
    ONE_HOT: _ClassVar[ShareEncoding]
    EMBEDDINGS: _ClassVar[ShareEncoding]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    DONE: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
DTYPE_UNSPECIFIED: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType
FLOAT64: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
OP_UNSPECIFIED: Op
OP_SEND: Op
OP_ALL_REDUCE: Op
OP_REDUCE: Op
OP_BROADCAST: Op
OP_GATHER: Op
OP_ALL_GATHER: Op
OP_SCATTER: Op
OP_BARRIER: Op
OP_SEND_OBJ: Op
OP_BROADCAST_OBJ: Op
OP_ABORT: Op
OP_CLOSE: Op
OP_OPEN: Op
OP_JOB_BEGIN: Op
OP_JOB_CHECK: Op
OP_JOB_END: Op
OP_JOB_ABORT: Op
REDUCE_OP_UNSPECIFIED: ReduceOp
SUM: ReduceOp
PRODUCT: ReduceOp
MIN: ReduceOp
MAX: ReduceOp
BAND: ReduceOp
BOR: ReduceOp
BXOR: ReduceOp
TUPLE_KIND_UNSPECIFIED: TupleKind
BEAVER_MUL: TupleKind
BEAVER_MATMUL: TupleKind
BEAVER_CONV1D: TupleKind
BEAVER_CONV2D: TupleKind
BEAVER_CONV_TRANSPOSE1D: TupleKind
BEAVER_CONV_TRANSPOSE2D: TupleKind
SQUARE: TupleKind
BINARY_AND: TupleKind
B2A_BIT: TupleKind
TRUNCATION_PAIR: TupleKind
EXACT_TRUNCATION: TupleKind
FIXED_MASK: TupleKind
FIXED_MUL: TupleKind
FIXED_MATMUL: TupleKind
FIXED_MATMUL_T: TupleKind
FSS_COMPARE: TupleKind
FSS_LUT: TupleKind
SHARE_ENCODING_UNSPECIFIED: ShareEncoding
TOKEN_IDS: ShareEncoding
ONE_HOT: ShareEncoding
EMBEDDINGS: ShareEncoding
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
DONE: JobState
CANCELLED: JobState
FAILED: JobState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "payload")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    payload: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class JobControl(_message.Message):
    __slots__ = ("positions", "digest", "cancel", "error")
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    digest: bytes
    cancel: str
    error: str
    def __init__(self, positions: _Optional[_Iterable[int]] = ..., digest: _Optional[bytes] = ..., cancel: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class PeerError(_message.Message):
    __slots__ = ("rank", "message")
    RANK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    message: str
    def __init__(self, rank: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class PeerMessage(_message.Message):
    __slots__ = ("session", "src", "seq", "op", "root", "reduce_op", "tensors", "object", "error", "job", "control")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    REDUCE_OP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    session: str
    src: int
    seq: int
    op: Op
    root: int
    reduce_op: ReduceOp
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    object: bytes
    error: PeerError
    job: int
    control: JobControl
    def __init__(self, session: _Optional[str] = ..., src: _Optional[int] = ..., seq: _Optional[int] = ..., op: _Optional[_Union[Op, str]] = ..., root: _Optional[int] = ..., reduce_op: _Optional[_Union[ReduceOp, str]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., object: _Optional[bytes] = ..., error: _Optional[_Union[PeerError, _Mapping]] = ..., job: _Optional[int] = ..., control: _Optional[_Union[JobControl, _Mapping]] = ...) -> None: ...

class PeerHello(_message.Message):
    __slots__ = ("session", "rank", "world_size", "protocol_version")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    rank: int
    world_size: int
    protocol_version: int
    def __init__(self, session: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class PeerAck(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class ConvParams(_message.Message):
    __slots__ = ("stride", "padding", "dilation", "groups", "output_padding")
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    DILATION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PADDING_FIELD_NUMBER: _ClassVar[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    padding: _containers.RepeatedScalarFieldContainer[int]
    dilation: _containers.RepeatedScalarFieldContainer[int]
    groups: int
    output_padding: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stride: _Optional[_Iterable[int]] = ..., padding: _Optional[_Iterable[int]] = ..., dilation: _Optional[_Iterable[int]] = ..., groups: _Optional[int] = ..., output_padding: _Optional[_Iterable[int]] = ...) -> None: ...

class TupleSpec(_message.Message):
    __slots__ = ("kind", "shape_a", "shape_b", "conv", "bitlength", "count", "divisor", "mask_tuple")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_A_FIELD_NUMBER: _ClassVar[int]
    SHAPE_B_FIELD_NUMBER: _ClassVar[int]
    CONV_FIELD_NUMBER: _ClassVar[int]
    BITLENGTH_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DIVISOR_FIELD_NUMBER: _ClassVar[int]
    MASK_TUPLE_FIELD_NUMBER: _ClassVar[int]
    kind: TupleKind
    shape_a: _containers.RepeatedScalarFieldContainer[int]
    shape_b: _containers.RepeatedScalarFieldContainer[int]
    conv: ConvParams
    bitlength: int
    count: int
    divisor: Tensor
    mask_tuple: int
    def __init__(self, kind: _Optional[_Union[TupleKind, str]] = ..., shape_a: _Optional[_Iterable[int]] = ..., shape_b: _Optional[_Iterable[int]] = ..., conv: _Optional[_Union[ConvParams, _Mapping]] = ..., bitlength: _Optional[int] = ..., count: _Optional[int] = ..., divisor: _Optional[_Union[Tensor, _Mapping]] = ..., mask_tuple: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("session", "rank", "world_size", "protocol_version")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    rank: int
    world_size: int
    protocol_version: int
    def __init__(self, session: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("dealer_id", "seed", "token")
    DEALER_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    dealer_id: str
    seed: bytes
    token: bytes
    def __init__(self, dealer_id: _Optional[str] = ..., seed: _Optional[bytes] = ..., token: _Optional[bytes] = ...) -> None: ...

class TupleRequest(_message.Message):
    __slots__ = ("session", "rank", "request_id", "specs", "token")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SPECS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    session: str
    rank: int
    request_id: int
    specs: _containers.RepeatedCompositeFieldContainer[TupleSpec]
    token: bytes
    def __init__(self, session: _Optional[str] = ..., rank: _Optional[int] = ..., request_id: _Optional[int] = ..., specs: _Optional[_Iterable[_Union[TupleSpec, _Mapping]]] = ..., token: _Optional[bytes] = ...) -> None: ...

class TupleResponse(_message.Message):
    __slots__ = ("request_id", "corrections")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CORRECTIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    corrections: _containers.RepeatedCompositeFieldContainer[Tensor]
    def __init__(self, request_id: _Optional[int] = ..., corrections: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ...) -> None: ...

class KeyRequest(_message.Message):
    __slots__ = ("session", "rank", "batch", "spec", "token")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    session: str
    rank: int
    batch: int
    spec: TupleSpec
    token: bytes
    def __init__(self, session: _Optional[str] = ..., rank: _Optional[int] = ..., batch: _Optional[int] = ..., spec: _Optional[_Union[TupleSpec, _Mapping]] = ..., token: _Optional[bytes] = ...) -> None: ...

class KeyChunk(_message.Message):
    __slots__ = ("batch", "chunk", "count", "corrections")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CORRECTIONS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    chunk: int
    count: int
    corrections: bytes
    def __init__(self, batch: _Optional[int] = ..., chunk: _Optional[int] = ..., count: _Optional[int] = ..., corrections: _Optional[bytes] = ...) -> None: ...

class SecretShare(_message.Message):
    __slots__ = ("encoding", "precision_bits", "share")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    PRECISION_BITS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    encoding: ShareEncoding
    precision_bits: int
    share: Tensor
    def __init__(self, encoding: _Optional[_Union[ShareEncoding, str]] = ..., precision_bits: _Optional[int] = ..., share: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class CachePolicy(_message.Message):
    __slots__ = ("method", "params")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    method: str
    params: _containers.ScalarMap[str, float]
    def __init__(self, method: _Optional[str] = ..., params: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GenerationSettings(_message.Message):
    __slots__ = ("max_new_tokens", "stop_token_ids", "reveal_stop", "cache")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REVEAL_STOP_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    reveal_stop: bool
    cache: CachePolicy
    def __init__(self, max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., reveal_stop: _Optional[bool] = ..., cache: _Optional[_Union[CachePolicy, _Mapping]] = ...) -> None: ...

class SubmitPromptRequest(_message.Message):
    __slots__ = ("request_id", "party", "model", "prompt_length", "prompt", "settings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    party: int
    model: str
    prompt_length: int
    prompt: SecretShare
    settings: GenerationSettings
    def __init__(self, request_id: _Optional[str] = ..., party: _Optional[int] = ..., model: _Optional[str] = ..., prompt_length: _Optional[int] = ..., prompt: _Optional[_Union[SecretShare, _Mapping]] = ..., settings: _Optional[_Union[GenerationSettings, _Mapping]] = ...) -> None: ...

class TokenShare(_message.Message):
    __slots__ = ("request_id", "index", "token", "last", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    token: SecretShare
    last: bool
    error: PeerError
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., token: _Optional[_Union[SecretShare, _Mapping]] = ..., last: _Optional[bool] = ..., error: _Optional[_Union[PeerError, _Mapping]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("request_id", "state", "tokens_generated", "rounds", "bytes_sent", "elapsed_s", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    state: JobState
    tokens_generated: int
    rounds: int
    bytes_sent: int
    elapsed_s: float
    error: str
    def __init__(self, request_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., tokens_generated: _Optional[int] = ..., rounds: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., elapsed_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled", "state")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    state: JobState
    def __init__(self, cancelled: _Optional[bool] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "role", "rank", "reason")
    class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[HealthResponse.ServingStatus]
        SERVING: _ClassVar[HealthResponse.ServingStatus]
        NOT_SERVING: _ClassVar[HealthResponse.ServingStatus]
    UNKNOWN: HealthResponse.ServingStatus
    SERVING: HealthResponse.ServingStatus
    NOT_SERVING: HealthResponse.ServingStatus
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    status: HealthResponse.ServingStatus
    role: str
    rank: int
    reason: str
    def __init__(self, status: _Optional[_Union[HealthResponse.ServingStatus, str]] = ..., role: _Optional[str] = ..., rank: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session", "rank", "token")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    session: str
    rank: int
    token: bytes
    def __init__(self, session: _Optional[str] = ..., rank: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("aborted", "reason")
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    reason: str
    def __init__(self, aborted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session", "rank", "error", "token")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    session: str
    rank: int
    error: str
    token: bytes
    def __init__(self, session: _Optional[str] = ..., rank: _Optional[int] = ..., error: _Optional[str] = ..., token: _Optional[bytes] = ...) -> None: ...

class CloseResponse(_message.Message):
    __slots__ = ("tuples_served", "bytes_served")
    TUPLES_SERVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SERVED_FIELD_NUMBER: _ClassVar[int]
    tuples_served: int
    bytes_served: int
    def __init__(self, tuples_served: _Optional[int] = ..., bytes_served: _Optional[int] = ...) -> None: ...

class FixedPointShare(_message.Message):
    __slots__ = ("precision_bits", "share")
    PRECISION_BITS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    precision_bits: int
    share: Tensor
    def __init__(self, precision_bits: _Optional[int] = ..., share: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class JobRequest(_message.Message):
    __slots__ = ("job_id", "party", "kind", "inputs", "params_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    party: int
    kind: str
    inputs: _containers.RepeatedCompositeFieldContainer[FixedPointShare]
    params_json: str
    def __init__(self, job_id: _Optional[str] = ..., party: _Optional[int] = ..., kind: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[FixedPointShare, _Mapping]]] = ..., params_json: _Optional[str] = ...) -> None: ...

class JobStats(_message.Message):
    __slots__ = ("elapsed_s", "rounds", "bytes", "dealer_bytes", "tuples", "report_json")
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DEALER_BYTES_FIELD_NUMBER: _ClassVar[int]
    TUPLES_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    elapsed_s: float
    rounds: int
    bytes: int
    dealer_bytes: int
    tuples: int
    report_json: str
    def __init__(self, elapsed_s: _Optional[float] = ..., rounds: _Optional[int] = ..., bytes: _Optional[int] = ..., dealer_bytes: _Optional[int] = ..., tuples: _Optional[int] = ..., report_json: _Optional[str] = ...) -> None: ...

class JobResult(_message.Message):
    __slots__ = ("job_id", "outputs", "stats")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    outputs: _containers.RepeatedCompositeFieldContainer[FixedPointShare]
    stats: JobStats
    def __init__(self, job_id: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[FixedPointShare, _Mapping]]] = ..., stats: _Optional[_Union[JobStats, _Mapping]] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reason", "request_id")
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    reason: str
    request_id: str
    def __init__(self, reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobProposal(_message.Message):
    __slots__ = ("session", "job", "job_id", "kind", "digest")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    session: str
    job: int
    job_id: str
    kind: str
    digest: bytes
    def __init__(self, session: _Optional[str] = ..., job: _Optional[int] = ..., job_id: _Optional[str] = ..., kind: _Optional[str] = ..., digest: _Optional[bytes] = ...) -> None: ...

class JobVerdict(_message.Message):
    __slots__ = ("accepted", "reason", "state")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    state: JobState
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class JobQuery(_message.Message):
    __slots__ = ("session", "job_id")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    session: str
    job_id: str
    def __init__(self, session: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class JobQueryResponse(_message.Message):
    __slots__ = ("state", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    reason: str
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ...) -> None: ...
