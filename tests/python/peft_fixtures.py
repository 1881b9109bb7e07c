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


TEXTS = [
    "the film was great.",
    "honestly, the meal was not good.",
    "we found the game boring and would say so again.",
    "all in all the book felt wonderful.",
]


def seq_cls(model_dir: str, out_dir: str) -> None:
    """A PEFT SEQ_CLS LoRA on BertForSequenceClassification (pooler + classifier, the
    classifier in modules_to_save), with seeded non-zero LoRA B factors and a classifier
    large enough to give decided probabilities: the adapter as
    saved, and the class probabilities PEFT's model gives for TEXTS, one at a time."""
    torch.manual_seed(1)
    base = transformers.BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, torch_dtype=torch.float32
    )
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
            elif "classifier" in name:
                p.copy_(0.5 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out_dir, "adapter"))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(model_dir, "tokenizer.json")
    )
    model.eval()
    rows = []
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            rows.append(
                {
                    "text": text,
                    "input_ids": ids[0].tolist(),
                    "logits": logits.tolist(),
                    "probabilities": torch.softmax(logits.double(), -1).tolist(),
                }
            )
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        json.dump(rows, f, indent=1)


def worker_export(model_dir: str, export_dir: str, worker_jsonl: str, out_json: str) -> None:
    """Loads a `delta export peft` of a worker-trained classifier the two ways PEFT users
    do, checks that every adapter key it holds is one PEFT expects and that PEFT expects
    no other, and that both predict what `delta-worker predict` printed (<= 1e-4)."""
    worker = [json.loads(line) for line in open(worker_jsonl)]
    saved = safetensors.torch.load_file(os.path.join(export_dir, "adapter_model.safetensors"))
    base = transformers.BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(worker[0]["labels"]), torch_dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(base, export_dir)
    # The keys PEFT would save for this model (its adapter weights, modules_to_save
    # included): the export must hold exactly these.
    wanted = set(peft.get_peft_model_state_dict(model).keys())
    got = set(saved.keys())
    assert wanted == got, {"missing": sorted(wanted - got), "unexpected": sorted(got - wanted)}
    auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(export_dir)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(model_dir, "tokenizer.json")
    )
    model.eval()
    auto.eval()
    rows = []
    worst = 0.0
    with torch.no_grad():
        for w in worker:
            ids = torch.tensor([tok(w["text"])["input_ids"]])
            probs = [
                torch.softmax(m(input_ids=ids).logits[0].double(), -1).tolist()
                for m in (model, auto)
            ]
            for p in probs:
                worst = max(worst, max(abs(a - b) for a, b in zip(p, w["probabilities"])))
            rows.append({"text": w["text"], "probabilities": probs[0]})
    assert worst <= 1e-4, worst
    if len(sys.argv) > 6:
        result(sys.argv[6], "worker-trained classifier → `delta export peft` → PeftModel and AutoPeftModelForSequenceClassification: keys, probabilities vs `delta-worker predict`", f"{len(got)} keys exactly as PEFT expects; max Δp {worst:.1e}")
    with open(out_json, "w") as f:
        json.dump({"keys": sorted(got), "rows": rows, "max_difference": worst}, f, indent=1)


def lora_merge(model_dir: str, out_dir: str) -> None:
    """rsLoRA with rank and alpha patterns on BertModel, seeded non-zero B factors: the
    adapter as saved and the first rows of what merge_and_unload makes of each changed
    weight."""
    torch.manual_seed(2)
    base = transformers.BertModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    config = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["query", "value"],
        rank_pattern={"value": 4},
        alpha_pattern={"query": 32},
    )
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out_dir, "adapter"))
    merged = model.merge_and_unload()
    state = merged.state_dict()
    expected = {
        k: state[k][:ROWS].contiguous()
        for k in state
        if k.endswith(("query.weight", "value.weight"))
    }
    safetensors.torch.save_file(expected, os.path.join(out_dir, "merged.safetensors"))


def merged_classifier(merged_dir: str, worker_jsonl: str) -> float:
    """A model `delta apply` merged from a staged classifier, loaded as
    BertForSequenceClassification: the largest difference from the probabilities the
    worker printed with the stages mounted."""
    worker = [json.loads(line) for line in open(worker_jsonl)]
    model = transformers.BertForSequenceClassification.from_pretrained(
        merged_dir, num_labels=len(worker[0]["labels"]), torch_dtype=torch.float32
    )
    model.eval()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(merged_dir, "tokenizer.json")
    )
    worst = 0.0
    with torch.no_grad():
        for w in worker:
            ids = torch.tensor([tok(w["text"])["input_ids"]])
            p = torch.softmax(model(input_ids=ids).logits[0].double(), -1).tolist()
            worst = max(worst, max(abs(a - b) for a, b in zip(p, w["probabilities"])))
    assert worst <= 1e-4, worst
    return worst


def result(path: str, check: str, figure: str) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"check": check, "figure": figure}) + "\n")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "worker-export":
        worker_export(*args[:4])
    elif cmd == "lora-merge":
        lora_merge(*args)
    elif cmd == "merged-classifier":
        worst = merged_classifier(args[0], args[1])
        result(args[2], "staged classifier (LoRA then BitFit) merged by `delta apply`, loaded as BertForSequenceClassification, vs the worker with the stages mounted", f"max Δp {worst:.1e}")
    elif cmd == "table":
        rows = [json.loads(line) for line in open(args[0])]
        print("| check | result |")
        print("|---|---|")
        for r in rows:
            print(f"| {r['check']} | {r['figure']} |")
    else:
        main(cmd, args[0])
        seq_cls(cmd, args[1])
