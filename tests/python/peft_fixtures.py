"""Writes fixtures made by the real PEFT (run by scripts/peft-interop.sh, not by the tests).

IA3 on all-MiniLM-L6-v2 (layer 0: key, value and both output.dense modules, the latter
feed-forward by PEFT's plain-suffix rule, so attention.output.dense is one too), with seeded non-trivial vectors: the adapter folder
exactly as `save_pretrained` writes it, and what `merge_and_unload` makes of the changed
modules (full biases, the first 16 rows of each weight, to keep the fixture small).
"""

import json
import os
import sys

import peft
import safetensors.torch
import torch
import transformers

ROWS = 16


def main(model_dir: str, out_dir: str) -> None:
    torch.manual_seed(0)
    base = transformers.BertModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    # IA3Config has no layers_to_transform: a regex (fullmatch) picks layer 0's modules.
    config = peft.IA3Config(
        target_modules=r".*layer\.0\.(attention\.self\.(key|value)|attention\.output\.dense|output\.dense)",
        feedforward_modules=["output.dense"],
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    adapter = os.path.join(out_dir, "adapter")
    model.save_pretrained(adapter)

    # What PEFT's forward computes on a few inputs, before merging: the merged model
    # must compute the same (a check of the script, not of this project).
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    merged = model.merge_and_unload()
    with torch.no_grad():
        after = merged(input_ids=ids).last_hidden_state
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()

    state = merged.state_dict()
    expected = {}
    modules = [
        "encoder.layer.0.attention.self.key",
        "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.output.dense",
    ]
    for m in modules:
        expected[f"{m}.weight"] = state[f"{m}.weight"][:ROWS].contiguous()
        expected[f"{m}.bias"] = state[f"{m}.bias"].contiguous()
    safetensors.torch.save_file(expected, os.path.join(out_dir, "merged.safetensors"))
    with open(os.path.join(out_dir, "versions.json"), "w") as f:
        json.dump(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "rows": ROWS,
                "modules": modules,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
