"""Work endpoints: create_model, forward_backward, optim_step, save/load weights, sampling sessions, asample.

Each answers at once with a future (`{"request_id": ...}`) and queues the work on the engine; bad input is
refused at submit with a 4xx naming the field (and, for a run's request, still consumes its seq_id).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import functools
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request

from service import wire
from service.checkpoints import BadPathError, TinkerPath, check_name
from service.common import Ctx, parse_model, read_json
from service.db import ApiSession, Checkpoint, Run, SamplingSession, utcnow
from service.runtime import PROTO, LiveModel, LiveSampler, json_result
from service.schemas import (
    AsampleReq,
    CreateModelReq,
    CreateSamplingSessionReq,
    LoadWeightsReq,
    OptimStepReq,
    SaveWeightsForSamplerReq,
    SaveWeightsReq,
)
from training_core import losses
from training_core import state as state_io
from training_core.engine import Engine, InputError
from training_core.types import AdamParams, LoraConfig, SamplingParams


def build_router(ctx: Ctx) -> APIRouter:
    r = APIRouter(prefix="/api/v1")
    rt, store, ckpts = ctx.runtime, ctx.store, ctx.ckpts
    auth = Depends(ctx.auth)

    # ---- lookups (404 for what does not exist and for what another key owns) ------------------------
    def own_session(owner: str, session_id: str) -> None:
        if store.get(ApiSession, session_id, owner) is None:
            raise HTTPException(404, f"session_id: session {session_id!r} not found")

    def live_model(owner: str, model_id: Any) -> LiveModel:
        m = rt.models.get(str(model_id))
        if m is not None and m.owner == owner:
            return m
        if store.get(Run, str(model_id), owner) is None:
            raise HTTPException(404, f"model_id: training run {model_id!r} not found")
        raise HTTPException(410, f"model_id: training run {model_id!r} is not live in this server process (it "
                                 "restarted); resume it from a checkpoint with create_training_client_from_state")

    def checkpoint(owner: str, path: str) -> tuple[TinkerPath, Checkpoint, Run]:
        try:
            tp = TinkerPath.parse(path)
        except BadPathError as e:
            raise HTTPException(400, str(e)) from None
        row = store.get(Checkpoint, str(tp), owner)
        run = store.get(Run, tp.run_id, owner)
        if row is None or run is None:
            raise HTTPException(404, f"path: checkpoint {path!r} not found")
        return tp, row, run

    def seq_of(raw: dict[str, Any]) -> int:
        seq = raw.get("seq_id")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise HTTPException(400, "seq_id: missing or not a non-negative integer")
        return seq

    def ordered(owner: str, raw: dict[str, Any], kind: str, make_job: Any) -> dict[str, Any]:
        """Common path of a run's request: idempotent on seq_id, a refused request consumes its seq_id."""
        model = live_model(owner, raw.get("model_id"))
        seq = seq_of(raw)
        prev = rt.seen(model.by_seq, model.run_id, seq, owner)
        if prev is not None:
            return {"request_id": prev, "model_id": model.run_id}
        try:
            made = make_job(model)  # a job, or (job, callback run on the loop once it succeeded)
        except HTTPException as e:
            rt.submit_ordered(model, seq, kind, None, reject=str(e.detail))
            raise
        job, on_done = made if isinstance(made, tuple) else (made, None)
        rec = rt.submit_ordered(model, seq, kind, job, on_done=on_done)
        now = time.monotonic()
        if now - model.touched > 5.0:  # last_request_time for listings, at most every 5 s per run
            model.touched = now
            rt.background(store.touch_run, model.run_id)
        return {"request_id": rec.request_id, "model_id": model.run_id}

    def new_run(owner: str, session_id: str, run_id: str, base: str, lora: LoraConfig, meta: Any,
                request_id: str) -> None:
        store.add(Run(id=run_id, owner=owner, session_id=session_id, base_model=base, lora=lora.__dict__,
                      user_metadata=meta, create_request_id=request_id))

    async def start_run(owner: str, session_id: str, run_id: str, base: str, lora: LoraConfig, meta: Any,
                        kind: str, load: tuple[TinkerPath, bool] | None = None) -> str:
        """create_model and load_weights-by-session: idempotent on (session, model_seq_id)."""
        if run_id in rt.creating:
            return rt.creating[run_id].request_id
        existing = store.get(Run, run_id, owner)
        if existing is not None:
            return existing.create_request_id
        rec = rt.new_future(owner, kind, run_id, 0)
        rt.creating[run_id] = rec
        try:
            eng = await rt.training_engine_for(base)
        except Exception as e:  # e.g. an unknown base model: the future reports it
            rt.creating.pop(run_id, None)
            user = isinstance(e, ValueError)
            rt.fail_now(rec, f"base_model: {e}" if user else f"{type(e).__name__}: {e}", "user" if user else "server")
            return rec.request_id
        adapter = eng.new_adapter_name("run")

        def job() -> tuple[str, bytes]:
            try:
                eng.add_adapter(adapter, lora)
                if load is not None:
                    load_checkpoint(eng, adapter, ckpts.read_dir(load[0].prefix), with_optimizer=load[1])
            except BaseException:
                eng.remove_adapter(adapter)
                raise
            new_run(owner, session_id, run_id, base, lora, meta, rec.request_id)
            if load is not None:
                return json_result({"path": str(load[0]), "model_id": run_id, "type": "load_weights"})
            return json_result({"model_id": run_id, "type": "create_model"})

        def registered() -> None:
            rt.models[run_id] = LiveModel(run_id, owner, session_id, base, eng, adapter)

        def finished(task: asyncio.Future[Any]) -> None:
            rt.tasks.discard(task)
            rt.creating.pop(run_id, None)  # done or failed: a retry now finds the run (or starts afresh)

        rt.run_on_engine(eng, rec, job, registered)
        watcher = asyncio.ensure_future(rec.event.wait())
        rt.tasks.add(watcher)  # the loop keeps only weak references to tasks
        watcher.add_done_callback(finished)
        return rec.request_id

    # ---- training ------------------------------------------------------------------------------
    @r.post("/create_model")
    async def create_model(request: Request, owner: str = auth) -> dict[str, Any]:
        req = parse_model(CreateModelReq, await read_json(request))
        own_session(owner, req.session_id)
        lc = req.lora_config
        if lc.rank <= 0 or lc.rank > 1024:
            raise HTTPException(400, f"lora_config.rank: must be in 1..1024, got {lc.rank}")
        if not (lc.train_attn or lc.train_mlp or lc.train_unembed):
            raise HTTPException(400, "lora_config: at least one of train_attn/train_mlp/train_unembed")
        lora = LoraConfig(rank=lc.rank, seed=lc.seed, train_attn=lc.train_attn, train_mlp=lc.train_mlp,
                          train_unembed=lc.train_unembed)
        run_id = f"{req.session_id}:train:{req.model_seq_id}"
        rid = await start_run(owner, req.session_id, run_id, req.base_model, lora, req.user_metadata,
                              "CreateModel")
        return {"request_id": rid, "model_id": run_id}

    @r.post("/get_info")
    async def get_info(request: Request, owner: str = auth) -> dict[str, Any]:
        raw = await read_json(request)
        model_id = str(raw.get("model_id", ""))
        run = store.get(Run, model_id, owner)
        if run is None:
            raise HTTPException(404, f"model_id: training run {model_id!r} not found")
        m = rt.models.get(model_id)
        arch = getattr(m.engine.base.model.config, "model_type", None) if m else None
        return {"type": "get_info", "model_id": model_id, "is_lora": True, "lora_rank": run.lora["rank"],
                "model_name": run.base_model,
                "model_data": {"arch": arch, "model_name": run.base_model,
                               "tokenizer_id": m.engine.base.path if m else None}}

    @r.post("/forward_backward")
    async def forward_backward(request: Request, owner: str = auth) -> dict[str, Any]:
        body = await request.body()
        if request.headers.get("content-encoding", "").lower() == "zstd":
            import zstandard

            try:
                body = zstandard.ZstdDecompressor().decompress(body, max_output_size=ctx.max_body_bytes)
            except zstandard.ZstdError as e:
                raise HTTPException(400, f"body: bad zstd stream ({e})") from None
        try:
            # big batches decode off the loop so heartbeats and long-polls stay responsive
            fb = wire.decode_forward_backward(body) if len(body) < (1 << 20) else \
                await asyncio.to_thread(wire.decode_forward_backward, body)
        except wire.WireError as e:
            raise HTTPException(400, str(e)) from None
        kind = "Forward" if fb.forward_only else "ForwardBackward"

        def make_job(model: LiveModel) -> Any:
            eng, adapter = model.engine, model.adapter
            try:
                losses.check_loss_fn(fb.loss_fn, fb.loss_fn_config)
            except ValueError as e:
                raise HTTPException(400, f"loss_fn: {e}") from None
            try:
                eng.validate(fb.data, fb.loss_fn)
            except InputError as e:
                raise HTTPException(400, f"data: {e}") from None

            def job() -> tuple[str, bytes]:
                out = eng.forward_backward(adapter, fb.data, fb.loss_fn, fb.loss_fn_config,
                                           backward=not fb.forward_only)
                return PROTO, wire.encode_forward_backward_output(out)

            return job

        return ordered(owner, {"model_id": fb.model_id, "seq_id": fb.seq_id}, kind, make_job)

    @r.post("/optim_step")
    async def optim_step(request: Request, owner: str = auth) -> dict[str, Any]:
        raw = await read_json(request)

        def make_job(model: LiveModel) -> Any:
            a = parse_model(OptimStepReq, raw).adam_params
            if a.learning_rate < 0 or not (0 <= a.beta1 < 1 and 0 <= a.beta2 < 1) or a.eps <= 0:
                raise HTTPException(400, "adam_params: need learning_rate >= 0, 0 <= beta < 1, eps > 0")
            adam = AdamParams(learning_rate=a.learning_rate, beta1=a.beta1, beta2=a.beta2, eps=a.eps,
                              weight_decay=a.weight_decay, grad_clip_norm=a.grad_clip_norm)
            eng, adapter = model.engine, model.adapter
            return lambda: json_result({"metrics": eng.optim_step(adapter, adam), "type": "optim_step"})

        return ordered(owner, raw, "OptimStep", make_job)

    def save_job(model: LiveModel, tp: TinkerPath, with_optimizer: bool, ttl: int | None, meta: Any,
                 overwrite: bool, result_type: str) -> Any:
        eng, adapter = model.engine, model.adapter

        def job() -> tuple[str, bytes]:
            if ckpts.write_dir(tp.prefix).exists() or store.get(Checkpoint, str(tp), model.owner):
                if not overwrite:
                    raise ValueError(f"path: checkpoint {tp} already exists (pass overwrite=True to replace it)")
                store.delete_checkpoint(str(tp), model.owner)
                ckpts.delete(tp.prefix)
            save = getattr(eng, "save_checkpoint", None)  # `--backend deepspeed`: the ranks write it
            if save is None:
                save = functools.partial(state_io.save_adapter_checkpoint, eng)
            save(adapter, ckpts.write_dir(tp.prefix), with_optimizer=with_optimizer,
                 metadata={"ttl_seconds": ttl, "user_metadata": meta})
            size = ckpts.commit(tp.prefix)
            expires = utcnow() + dt.timedelta(seconds=ttl) if ttl else None
            # the database row is what makes it "committed" for listings: written after the manifest
            store.add(Checkpoint(tinker_path=str(tp), owner=model.owner, run_id=model.run_id, kind=tp.kind,
                                 name=tp.name, storage_prefix=tp.prefix, size_bytes=size, user_metadata=meta,
                                 expires_at=expires))
            store.touch_run(model.run_id)
            return json_result({"path": str(tp), "type": result_type})

        return job

    def named(model: LiveModel, segment: str, name: Any) -> TinkerPath:
        try:
            return TinkerPath(model.run_id, segment, check_name(str(name) if name is not None else ""))
        except BadPathError as e:
            raise HTTPException(400, str(e)) from None

    @r.post("/save_weights")
    async def save_weights(request: Request, owner: str = auth) -> dict[str, Any]:
        raw = await read_json(request)

        def make_job(model: LiveModel) -> Any:
            req = parse_model(SaveWeightsReq, raw)
            tp = named(model, "weights", req.path)
            return save_job(model, tp, True, req.ttl_seconds, req.user_metadata, req.overwrite, "save_weights")

        return ordered(owner, raw, "SaveWeights", make_job)

    @r.post("/save_weights_external")
    async def save_weights_external(request: Request, owner: str = auth) -> dict[str, Any]:
        """The adapter (no optimizer state) as a checkpoint whose files `tinker checkpoint download` fetches."""
        raw = await read_json(request)

        def make_job(model: LiveModel) -> Any:
            req = parse_model(SaveWeightsReq, raw)
            if raw.get("age_encryption_recipients"):
                raise HTTPException(400, "age_encryption_recipients: encrypted exports are not supported")
            tp = named(model, "external_weights", req.path)
            return save_job(model, tp, False, req.ttl_seconds, req.user_metadata, True, "save_weights_external")

        return ordered(owner, raw, "SaveWeightsExternal", make_job)

    @r.post("/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request, owner: str = auth) -> dict[str, Any]:
        raw = await read_json(request)

        def make_job(model: LiveModel) -> Any:
            req = parse_model(SaveWeightsForSamplerReq, raw)
            if req.path is not None:
                tp = named(model, "sampler_weights", req.path)
                return save_job(model, tp, False, req.ttl_seconds, req.user_metadata, False,
                                "save_weights_for_sampler")
            if req.sampling_session_seq_id is None:
                raise HTTPException(400, "path: give a name, or sampling_session_seq_id for an ephemeral sampler")
            return snapshot_job(model, f"{model.session_id}:sample:{req.sampling_session_seq_id}")

        return ordered(owner, raw, "SaveWeightsForSampler", make_job)

    def snapshot_job(model: LiveModel, sid: str) -> Any:
        """An ephemeral sampler: a copy of the run's adapter at this point of its seq_id order."""
        eng, src = model.engine, model.adapter
        name = eng.new_adapter_name("snap")
        sampling: list[Engine] = [eng]

        def job() -> tuple[str, bytes]:
            nonlocal name
            if hasattr(eng, "snapshot_for_sampler"):  # `--backend deepspeed`: sample on the local engine
                local, name = eng.snapshot_for_sampler(src)
                sampling[0] = local
            else:
                eng.add_adapter(name, copy.deepcopy(eng.adapters[src].lora))
                state_io.set_adapter_tensors(eng, name, state_io.adapter_tensors(eng, src), "snapshot")
            store.add(SamplingSession(id=sid, owner=model.owner, base_model=model.base_model, ephemeral=True))
            return json_result({"sampling_session_id": sid, "type": "save_weights_for_sampler"})

        def registered() -> None:
            rt.samplers[sid] = LiveSampler(sid, model.owner, model.base_model, sampling[0], name, None,
                                           owned_adapter=True)
            model.ephemeral.append(sid)
            rt.evict_ephemeral(model)

        return job, registered

    @r.post("/load_weights")
    async def load_weights(request: Request, owner: str = auth) -> dict[str, Any]:
        raw = await read_json(request)
        if raw.get("model_id") is None:  # session addressing: a new run from the checkpoint
            req = parse_model(LoadWeightsReq, raw)
            if req.session_id is None or req.model_seq_id is None:
                raise HTTPException(400, "model_id: give model_id + seq_id, or session_id + model_seq_id")
            own_session(owner, req.session_id)
            tp, _, src = checkpoint(owner, req.path)
            if req.optimizer and tp.kind != "training":
                raise HTTPException(400, f"path: {tp} holds sampler weights only; no optimizer state to load")
            run_id = f"{req.session_id}:train:{req.model_seq_id}"
            lora = LoraConfig(**src.lora)
            rid = await start_run(owner, req.session_id, run_id, src.base_model, lora,
                                  req.user_metadata or src.user_metadata, "LoadWeights", (tp, req.optimizer))
            return {"request_id": rid, "model_id": run_id}

        def make_job(model: LiveModel) -> Any:
            req = parse_model(LoadWeightsReq, raw)
            tp, _, _ = checkpoint(owner, req.path)
            eng, adapter = model.engine, model.adapter

            def job() -> tuple[str, bytes]:
                load_checkpoint(eng, adapter, ckpts.read_dir(tp.prefix), with_optimizer=req.optimizer)
                return json_result({"path": str(tp), "type": "load_weights"})

            return job

        return ordered(owner, raw, "LoadWeights", make_job)

    # ---- sampling ------------------------------------------------------------------------------
    async def open_sampler(owner: str, sid: str, base: str, model_path: str | None) -> LiveSampler:
        eng = await rt.engine_for(base)
        if model_path is None:
            s = LiveSampler(sid, owner, base, eng, None, None)
        else:
            tp, _, _ = checkpoint(owner, model_path)
            name = eng.new_adapter_name("sampler")

            def load() -> None:
                local = ckpts.read_dir(tp.prefix)
                eng.add_adapter(name, state_io.lora_config_from_checkpoint(local))
                state_io.load_adapter_checkpoint(eng, name, local, with_optimizer=False)

            try:
                await eng.submit(load)
            except (ValueError, FileNotFoundError) as e:
                raise HTTPException(400, f"model_path: {e}") from None
            s = LiveSampler(sid, owner, base, eng, name, model_path, owned_adapter=True)
        rt.add_sampler(s)
        return s

    async def live_sampler(owner: str, sid: str) -> LiveSampler:
        s = rt.samplers.get(sid)
        if s is not None and s.owner == owner:
            rt.touch_sampler(s)
            return s
        row = store.get(SamplingSession, sid, owner)
        if row is None:
            raise HTTPException(404, f"sampling_session_id: sampler {sid!r} not found")
        if row.ephemeral:
            raise HTTPException(410, f"sampling_session_id: sampler {sid!r} was ephemeral and is gone "
                                     "(evicted or the server restarted); save weights again")
        try:
            return await open_sampler(owner, sid, row.base_model, row.model_path)
        except HTTPException as e:  # its checkpoint was deleted meanwhile
            raise HTTPException(410, f"sampling_session_id: sampler {sid!r} cannot be reopened: {e.detail}") from None

    @r.post("/create_sampling_session")
    async def create_sampling_session(request: Request, owner: str = auth) -> dict[str, Any]:
        req = parse_model(CreateSamplingSessionReq, await read_json(request))
        own_session(owner, req.session_id)
        sid = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        if sid in rt.samplers or store.get(SamplingSession, sid, owner) is not None:
            return {"sampling_session_id": sid, "type": "create_sampling_session"}
        if req.model_path is not None:
            _, _, run = checkpoint(owner, req.model_path)
            base = run.base_model
        elif req.base_model:
            base = req.base_model
        else:
            raise HTTPException(400, "model_path: give model_path or base_model")
        try:
            await open_sampler(owner, sid, base, req.model_path)
        except ValueError as e:
            raise HTTPException(400, f"base_model: {e}") from None
        store.add(SamplingSession(id=sid, owner=owner, base_model=base, model_path=req.model_path))
        return {"sampling_session_id": sid, "type": "create_sampling_session"}

    @r.get("/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, owner: str = auth) -> dict[str, Any]:
        row = store.get(SamplingSession, sampler_id, owner)
        if row is None:
            raise HTTPException(404, f"sampler {sampler_id!r} not found")
        return {"sampler_id": sampler_id, "base_model": row.base_model, "model_path": row.model_path}

    @r.post("/asample")
    async def asample(request: Request, owner: str = auth) -> dict[str, Any]:
        raw = await read_json(request)
        req = parse_model(AsampleReq, raw)
        if req.sampling_session_id is None:
            raise HTTPException(400, "sampling_session_id: missing (base_model/model_path addressing is not supported)")
        s = await live_sampler(owner, req.sampling_session_id)
        ids = [f"{s.id}:{req.seq_id}:{i}" for i in range(req.num_samples)]
        prev = rt.seen(s.by_seq, s.id, req.seq_id, owner)
        if prev is not None:
            return {"request_id": prev, "sample_sequence_ids": ids}
        job = sample_job(s.engine, s.adapter, req)
        rec = rt.new_future(owner, "Sample", s.id, req.seq_id)
        rt.remember(s.by_seq, req.seq_id, rec.request_id)
        rt.run_on_engine(s.engine, rec, job)
        return {"request_id": rec.request_id, "sample_sequence_ids": ids}

    return r


def load_checkpoint(eng: Engine, adapter: str, path: Path, *, with_optimizer: bool) -> int:
    hook = getattr(eng, "load_checkpoint", None)  # `--backend deepspeed`: the ranks load it
    if hook is not None:
        return int(hook(adapter, path, with_optimizer=with_optimizer))
    return state_io.load_adapter_checkpoint(eng, adapter, path, with_optimizer=with_optimizer)


def sample_job(eng: Engine, adapter: str | None, req: AsampleReq) -> Any:
    from training_core import sampler

    toks: list[int] = []
    for j, ch in enumerate(req.prompt.chunks):
        if ch.get("type", "encoded_text") != "encoded_text" or not isinstance(ch.get("tokens"), list):
            raise HTTPException(400, f"prompt.chunks[{j}]: only encoded_text chunks with a tokens list")
        toks.extend(ch["tokens"])
    vocab, ctx_len = eng.base.vocab_size, eng.base.max_length
    if not toks:
        raise HTTPException(400, "prompt: empty")
    bad = next(((i, t) for i, t in enumerate(toks) if not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise HTTPException(400, f"prompt: token id {bad[1]!r} at position {bad[0]} outside vocab [0, {vocab})")
    p = req.sampling_params
    if len(toks) + (p.max_tokens or 0) > ctx_len:
        raise HTTPException(400, f"sampling_params.max_tokens: prompt ({len(toks)}) + max_tokens ({p.max_tokens}) "
                                 f"exceed the model context of {ctx_len}")
    if req.topk_sample_logprobs or req.prompt_alt_tokens_k or req.prompt_logprobs_last_n is not None:
        raise HTTPException(400, "topk_sample_logprobs / prompt_alt_tokens_k / prompt_logprobs_last_n: not supported")
    params = SamplingParams(max_tokens=p.max_tokens, seed=p.seed, stop=p.stop, temperature=p.temperature,
                            top_k=p.top_k, top_p=p.top_p)
    tok = eng.base.tokenizer
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    extra = getattr(getattr(eng.base.model, "generation_config", None), "eos_token_id", None)
    eos.update([extra] if isinstance(extra, int) else (extra or []))
    want_plp, topk = req.prompt_logprobs, req.topk_prompt_logprobs

    def job() -> tuple[str, bytes]:
        from training_core.types import SampleResponse

        with eng.activate(adapter):
            seqs = sampler.sample_batch(eng.model, [toks], params, req.num_samples, eos_token_ids=sorted(eos),
                                        tokenizer=tok)[0]
            plp = top = None
            if want_plp or topk:
                plp, top = sampler.prompt_logprobs(eng.model, toks, topk)
        resp = SampleResponse(sequences=seqs, prompt_logprobs=plp if want_plp else None, topk_prompt_logprobs=top)
        return PROTO, wire.encode_sample_response(resp, topk)

    return job
