"""The PyTorch side of `cargo bench -p delta-worker --bench methods`: one training method
on MiniLM in this process, timed as the worker times it (forward + backward + AdamW step
on BertForSequenceClassification in train mode, so with its dropout; median step after
the first), printed as one JSON line with the peak RSS.

    python bench_torch.py MODEL_DIR TEXTS_JSONL METHOD BATCH STEPS THREADS

PEFT has LoRA, prefix and prompt tuning. The other methods are plain torch, as close to
the worker's as torch allows (`equivalent` in the output says how):
BitFit trains the biases, last-layer the last encoder layer, selective the feed-forward
modules (intermediate.dense, output.dense), diff pruning the query/value weights with an
L1 penalty (dense, as the worker trains it), and adapters are Houlsby bottlenecks (16)
added after each attention and feed-forward output by forward hooks. The classifier is
trained with every method, as the worker's head is.
"""

import json
import resource
import sys
import time

import torch
import transformers


def trainable_model(model_dir: str, method: str):
    model = transformers.BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, torch_dtype=torch.float32
    )
    equivalent = "same method"
    if method in ("lora", "prefix", "prompt"):
        import peft

        config = {
            "lora": lambda: peft.LoraConfig(
                task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]
            ),
            "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8),
            "prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=8),
        }[method]()
        return peft.get_peft_model(model, config), "PEFT"
    if method == "full":
        return model, equivalent
    for p in model.parameters():
        p.requires_grad = False
    for p in model.classifier.parameters():
        p.requires_grad = True
    layers = model.bert.encoder.layer
    if method == "bitfit":
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad = True
    elif method == "last-layer":
        for p in layers[-1].parameters():
            p.requires_grad = True
    elif method == "selective":
        for layer in layers:
            for m in (layer.intermediate.dense, layer.output.dense):
                for p in m.parameters():
                    p.requires_grad = True
    elif method == "diff":
        for layer in layers:
            for m in (layer.attention.self.query, layer.attention.self.value):
                m.weight.requires_grad = True
        equivalent = "plain torch: dense query/value weights + L1 penalty"
    elif method == "adapter":
        hidden = model.config.hidden_size
        adapters = torch.nn.ModuleList()
        for layer in layers:
            for host in (layer.attention.output.dense, layer.output.dense):
                a = torch.nn.Sequential(
                    torch.nn.Linear(hidden, 16), torch.nn.GELU(), torch.nn.Linear(16, hidden)
                )
                torch.nn.init.zeros_(a[2].weight)
                torch.nn.init.zeros_(a[2].bias)
                adapters.append(a)
                host.register_forward_hook(lambda _m, _i, out, a=a: out + a(out))
        model.adapters = adapters
        equivalent = "plain torch: Houlsby bottleneck 16 by forward hooks"
    else:
        raise SystemExit(f"unknown method {method}")
    if method in ("bitfit", "last-layer", "selective"):
        equivalent = "plain torch: requires_grad on the same tensors"
    return model, equivalent


def main(model_dir, texts_jsonl, method, batch, steps, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    texts = [json.loads(line) for line in open(texts_jsonl)]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
    tok.pad_token = "[PAD]"
    model, equivalent = trainable_model(model_dir, method)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    times = []
    for step in range(steps + 1):
        rows = texts[step * batch : (step + 1) * batch]
        enc = tok(
            [r["text"] for r in rows],
            truncation=True,
            max_length=64,
            padding=True,
            return_tensors="pt",
        )
        labels = torch.tensor([int(r["label"] == "positive") for r in rows])
        start = time.perf_counter()
        try:
            out = model(**enc, labels=labels)
        except ValueError as e:
            # PEFT's prefix tuning needs past_key_values, which transformers 5's BERT no
            # longer accepts: say so instead of timing something else.
            print(json.dumps({"method": method, "median_ms": None, "peak_rss_mb": None,
                              "equivalent": f"not run: {str(e)[:90]}", "torch": torch.__version__}))
            return
        loss = out.loss
        if method == "diff":
            loss = loss + 1e-5 * sum(p.abs().sum() for p in params if p.dim() == 2 and p.shape[0] == p.shape[1])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    print(
        json.dumps(
            {
                "method": method,
                "median_ms": times[len(times) // 2],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                "equivalent": equivalent,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], int(a[3]), int(a[4]), int(a[5]))
