"""Export: a merged HF dir loadable by plain transformers with the adapter model's logits; a PEFT adapter dir."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from training_core import ServiceClient, types
from training_core.export import export_merged, export_peft_adapter


def test_merged_and_peft_exports_match_adapter_logits(tmp_path):
    sc = ServiceClient(checkpoint_root=tmp_path / "ck")
    tc = sc.create_lora_training_client("tiny", rank=8, seed=0, train_unembed=True)
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(5, tc._engine.base.vocab_size, (4, 17), generator=g)
    data = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": t[1:], "weights": torch.ones(16)}) for t in toks]
    for _ in range(5):  # move the adapter well away from its zero init
        tc.forward_backward(data)
        tc.optim_step(types.AdamParams(learning_rate=2e-2))
    ck = tc.save_state("final").result().path
    ids = toks[:, :-1]
    eng = tc._engine

    def logits(adapter):  # runs on the engine's worker, where all model access is serialized
        with torch.no_grad(), eng.activate(adapter):
            return eng.model(input_ids=ids).logits

    want = eng.submit(lambda: logits(tc._adapter)).result()
    base_logits = eng.submit(lambda: logits(None)).result()
    assert (want - base_logits).abs().max() > 1e-3, "training must have changed the logits"

    merged_dir = export_merged(ck, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no peft
    with torch.no_grad():
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    from peft import PeftModel

    adapter_dir = export_peft_adapter(ck, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(eng.base.path)
    pm = PeftModel.from_pretrained(base, adapter_dir)
    with torch.no_grad():
        got2 = pm(input_ids=ids).logits
    torch.testing.assert_close(got2, want, atol=1e-4, rtol=0)
