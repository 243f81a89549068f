"""Protobuf <-> training_core types for the two binary paths of the protocol.

Requests: only `/api/v1/forward_backward` is protobuf (`ForwardBackwardRequest`). Results: the SDK accepts
`ForwardBackwardOutput` and `SampleResponse` only as protobuf. Every decode error names the offending field
(`data[3].loss_fn_inputs['weights']`) so the client's 400 says what to fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from service import _tinker_proto as pb
from training_core import types

_NP = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
TOPK_EMPTY_LOGPROB = -99999.0  # the SDK's sentinel for an empty top-k cell


class WireError(ValueError):
    """A request body that does not decode; the message names the field."""


@dataclass
class FwdBwdRequest:
    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool
    data: list[types.Datum]


def _tensor(msg: object, where: str) -> types.TensorData:
    dt = _NP.get(msg.dtype)  # type: ignore[attr-defined]
    if dt is None:
        raise WireError(f"{where}: unsupported dtype {msg.dtype} (float32 or int64)")  # type: ignore[attr-defined]
    shape = [int(s) for s in msg.shape]  # type: ignore[attr-defined]
    try:
        if msg.HasField("sparse_csr"):  # type: ignore[attr-defined]
            csr = msg.sparse_csr  # type: ignore[attr-defined]
            vals = np.frombuffer(csr.values, dtype=dt)
            crow = np.frombuffer(csr.crow_indices, dtype=np.int64)
            col = np.frombuffer(csr.col_indices, dtype=np.int64)
            if len(shape) != 2 or len(crow) != shape[0] + 1:
                raise WireError(f"{where}: sparse_csr needs a 2-D shape and rows+1 crow_indices")
            arr = np.zeros(shape, dtype=dt)
            for r in range(shape[0]):
                arr[r, col[crow[r]:crow[r + 1]]] = vals[crow[r]:crow[r + 1]]
        else:
            arr = np.frombuffer(msg.dense, dtype=dt)  # type: ignore[attr-defined]
    except (ValueError, IndexError) as e:
        raise WireError(f"{where}: undecodable tensor bytes ({e})") from None
    n = int(np.prod(shape)) if shape else arr.size
    if arr.size != n:
        raise WireError(f"{where}: {arr.size} values do not fill shape {shape}")
    is_int = dt is not np.float32
    if not is_int and not np.all(np.isfinite(arr)):
        raise WireError(f"{where}: contains NaN or infinity")
    return types.TensorData(data=arr.reshape(-1).astype(np.int64 if is_int else np.float32).tolist(),
                            dtype="int64" if is_int else "float32", shape=shape or [arr.size])


def decode_forward_backward(body: bytes) -> FwdBwdRequest:
    msg = pb.ForwardBackwardRequest()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError (a plain Exception subclass) on garbage
        raise WireError(f"body: not a ForwardBackwardRequest protobuf ({e})") from None
    if not msg.model_id:
        raise WireError("model_id: missing")
    cfg: dict[str, float] = {k: float(v) for k, v in msg.loss_fn_config.items()}
    for k, v in msg.loss_fn_config_v2.items():  # v2 wins where both are set; text values are custom-loss ids
        if v.WhichOneof("value") == "text":
            raise WireError(f"loss_fn_config_v2[{k!r}]: text values (server-side custom losses) are not supported")
        cfg[k] = float(v.number)
    data: list[types.Datum] = []
    for i, d in enumerate(msg.data):
        toks: list[int] = []
        for j, ch in enumerate(d.model_input):
            kind = ch.WhichOneof("chunk")
            if kind != "encoded_text":
                raise WireError(f"data[{i}].model_input[{j}]: {kind} chunks are not supported (text only)")
            if len(ch.encoded_text.tokens) % 4:
                raise WireError(f"data[{i}].model_input[{j}].tokens: not int32 little-endian bytes")
            toks.extend(np.frombuffer(ch.encoded_text.tokens, dtype="<i4").tolist())
        inputs = {k: _tensor(t, f"data[{i}].loss_fn_inputs[{k!r}]") for k, t in d.loss_fn_inputs.items()}
        data.append(types.Datum(model_input=types.ModelInput.from_ints(toks), loss_fn_inputs=inputs))
    return FwdBwdRequest(model_id=msg.model_id, seq_id=int(msg.seq_id), loss_fn=msg.loss_fn or "cross_entropy",
                         loss_fn_config=cfg, forward_only=bool(msg.forward_only), data=data)


def encode_forward_backward_output(out: types.ForwardBackwardOutput) -> bytes:
    """One batched ArrayRecord: per-datum arrays concatenated, int64 byte offsets (N+1 entries)."""
    msg = pb.ForwardBackwardOutput()
    msg.loss_fn_output_type = out.loss_fn_output_type
    rec = msg.loss_fn_outputs.add()
    rec.type_tag = "ArrayRecord"
    rec.num_datums = len(out.loss_fn_outputs)
    names = sorted(out.loss_fn_outputs[0]) if out.loss_fn_outputs else []
    for name in names:
        arrs = [np.asarray(o[name].data, dtype=np.float32 if o[name].dtype == "float32" else np.int64)
                for o in out.loss_fn_outputs]
        bt = rec.fields[name]
        bt.dtype = pb.DTYPE_FLOAT32 if out.loss_fn_outputs[0][name].dtype == "float32" else pb.DTYPE_INT64
        bt.data = b"".join(a.tobytes() for a in arrs)
        bt.offsets = np.cumsum([0] + [a.nbytes for a in arrs], dtype=np.int64).tobytes()
    for k, v in out.metrics.items():
        msg.metrics[k] = float(v)
    return msg.SerializeToString()


def _topk(rows: list[list[tuple[int, float]] | None], k: int, msg: object) -> None:
    ids = np.zeros((len(rows), k), dtype=np.int32)
    lps = np.full((len(rows), k), TOPK_EMPTY_LOGPROB, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (tok, lp) in enumerate((row or [])[:k]):
            ids[i, j], lps[i, j] = tok, lp
    msg.token_ids, msg.logprobs, msg.k, msg.length = ids.tobytes(), lps.tobytes(), k, len(rows)  # type: ignore[attr-defined]


def encode_sample_response(resp: types.SampleResponse, topk_prompt: int = 0) -> bytes:
    msg = pb.SampleResponse()
    for s in resp.sequences:
        seq = msg.sequences.add()
        seq.stop_reason = pb.STOP_REASON_STOP if s.stop_reason == "stop" else pb.STOP_REASON_LENGTH
        seq.tokens = np.asarray(s.tokens, dtype="<i4").tobytes()
        if s.logprobs is not None:
            seq.logprobs = np.asarray(s.logprobs, dtype="<f4").tobytes()
    if resp.prompt_logprobs is not None:  # position 0 has no logprob: NaN on the wire, None in the SDK
        msg.prompt_logprobs = np.asarray([math.nan if v is None else v for v in resp.prompt_logprobs],
                                         dtype="<f4").tobytes()
    if topk_prompt and resp.topk_prompt_logprobs is not None:
        _topk(resp.topk_prompt_logprobs, topk_prompt, msg.topk_prompt_logprobs)
    return msg.SerializeToString()
