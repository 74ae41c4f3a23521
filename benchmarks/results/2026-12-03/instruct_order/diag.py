import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
import torch
from omegaconf import open_dict
from stages import config, conversations

import afpt.instruct.stage as instruct
import afpt.pretrain.stage as pretrain

OUT = os.environ["OUT"]
CPU = os.environ.get("DIAG_CPU")
LEN = int(os.environ.get("LEN", 128 if CPU else 1024))  # longest instruct row
IB = int(os.environ.get("IB", 4 if CPU else 64))  # chats per instruct step
common = [
    "model=tiny" if CPU else "model=llama_124m",
    "trainer=cpu" if CPU else "trainer=gpu",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "callbacks.model_checkpoint=null",
    "callbacks.throughput.window=20",
    "data.block_size=128" if CPU else "data.block_size=1024",
    "data.batch_size=4" if CPU else "data.batch_size=64",
    "data.world.train_docs_per_language=1000",
    "data.world.val_docs_per_language=50",
    "trainer.limit_val_batches=1",
]
root = tempfile.mkdtemp()
T0 = time.time()
cfg = config([*common, "trainer.max_steps=2", "optim.compile=false", "trainer.val_check_interval=2"], f"{root}/pre")
pretrain.run(cfg)
print("pretrain done", time.time() - T0, flush=True)
variants = [a.split() for a in sys.argv[1:]]
for words in variants:
    if time.time() - T0 > float(os.environ.get("BUDGET", "400")):
        print("skip", words)
        continue
    turns = next((int(w[6:]) for w in words if w.startswith("turns=")), 40)
    chats = Path(root) / f"chats-{turns}.jsonl"
    chats.write_text(
        "".join(json.dumps(c) + "\n" for c in conversations(cfg, int(os.environ.get("NCONV", 100)) * IB, turns, 0))
    )
    tag = "_".join(words) or "default"
    cfg2 = config(
        [
            *common,
            f"init_from={root}/pre/model",
            "instruct.source=dataset",
            "instruct.format=messages",
            f"instruct.files={chats}",
            f"instruct.max_length={LEN}",
            "instruct.overflow=truncate",
            f"instruct.batch_size={IB}",
            "instruct.epochs=1",
            "instruct.heldout_fraction=0.01",
            "instruct.eval_questions=0",
            *(w for w in words if not w.startswith("turns=")),
        ],
        f"{root}/{tag}",
    )
    with open_dict(cfg2):
        cfg2.callbacks.steptimes = {
            "_target_": "steptimes.StepTimes",
            "tag": "".join(c if c.isalnum() else "_" for c in tag),
        }
    if not os.environ.get("NOPROF"):
        with open_dict(cfg2):
            cfg2.callbacks.hostprof = {"_target_": "hostprof.HostProfile", "tag": tag, "start": 60, "n": 20}
    torch._dynamo.reset()
    t = time.time()
    m = instruct.run(cfg2)
    th = m["throughput"]
    print(
        f"ROW {tag}: steps {m['global_step']} tok/s {th.get('tokens_per_s')} real {th.get('real_tokens_per_s')} step_ms {th.get('step_ms')} recompiles {th.get('recompiles_after_warmup')} mallocs {th.get('device_mallocs')} retries {th.get('alloc_retries')} windows {th.get('steady_windows')} wall {time.time() - t:.0f}",
        flush=True,
    )
