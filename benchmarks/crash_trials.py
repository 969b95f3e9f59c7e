"""Crash trials: SIGKILL during saves (local disk and S3 on a loopback moto server) and
during training (killed, then resumed from its checkpoint).

A save trial starts a child process that saves a large adapter over a previous one and
kills it (SIGKILL) after a seeded random delay within the measured save time. Whatever
the moment, the URL must hold one whole version (the previous adapter or the complete
new one), load and verify; on S3 the killed multipart upload is left behind, and the
next save to the key must abort it (none left). A training trial kills an ``adapterkit
train`` process at a seeded random moment after its first checkpoint, resumes it with
``--resume``, and compares the final adapter with an uninterrupted run's, tensor by
tensor, bit for bit.

    python benchmarks/crash_trials.py                 # 20 local + 20 S3 save trials, 6 training trials
    python benchmarks/crash_trials.py --quick         # 2 + 2 + 1, a smoke run
    python benchmarks/crash_trials.py --out DIR       # also write crash_trials.json

A loss is any trial that ends with neither whole version, a file that fails to load or
verify, an incomplete upload left after the next save, or a resumed run that differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

SAVER = textwrap.dedent("""
    import sys, torch, adapterkit
    from torch import nn
    url, value = sys.argv[1], float(sys.argv[2])
    options = {"client_kwargs": {"endpoint_url": sys.argv[3]}} if len(sys.argv) > 3 else None
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)])
    adapterkit.attach(model, {"adapter": {"kind": "lora", "targets": ["re:\\\\d+"], "r": 1024}})
    with torch.no_grad():
        for tensor in adapterkit.adapter_state_dict(model).values():
            tensor.fill_(value)
    print("saving", flush=True)
    adapterkit.save(model, url, storage_options=options)
    print("saved", flush=True)
""")

MODEL_MODULE = textwrap.dedent("""
    from torch import nn

    def mlp(hidden=32):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU())
""")

TRAIN_CONFIG = """
[model]
backbone = "crash_model:mlp"
[data]
dataset = "digits"
[recipe]
seed = 0
[recipe.adapter]
kind = "lora"
targets = ["1", "3"]
r = 4
dropout = 0.1
[recipe.splitter]
name = "mosa"
n_cells = 2
share = "none"
[recipe.sampler]
name = "mosa"
[recipe.merger]
name = "mosa"
[optim]
lr = 1e-2
warmup = 2
[train]
steps = {steps}
batch_size = 32
seed = 3
threads = 1
loss = {{ name = "consistency", weight = 1.0 }}
[eval]
every_epoch = false
[checkpoint]
url = "{checkpoint}"
every = 5
[output]
adapter = "{adapter}"
"""


def _value_of(data: bytes) -> float | None:
    """Which saver wrote ``data`` (the fill value of its tensors), after verifying it."""
    import adapterkit

    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(data)
        f.flush()
        tensors = adapterkit.load_tensors(f.name)  # verifies every digest
    values = {float(t.flatten()[0]) for t in tensors.values() if t.numel()}
    return values.pop() if len(values) == 1 else None


def save_trials(backend: str, n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    server = None
    if backend == "s3":
        import boto3
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        endpoint = f"http://127.0.0.1:{server._server.server_port}"  # noqa: SLF001
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="trials")
        url, extra = "s3://trials/lib/adapter.safetensors", [endpoint]

        def read() -> bytes:
            body = client.get_object(Bucket="trials", Key="lib/adapter.safetensors")["Body"]
            return body.read()  # type: ignore[no-any-return]

        def uploads() -> int:
            return len(client.list_multipart_uploads(Bucket="trials").get("Uploads", []))

        writing = uploads
    else:
        folder = tempfile.mkdtemp(prefix="crash-")
        url, extra = f"{folder}/adapter.safetensors", []

        def read() -> bytes:
            with open(url, "rb") as f:
                return f.read()

        def uploads() -> int:
            return sum(1 for name in os.listdir(folder) if name.startswith("."))  # dead writers' temp files

        writing = uploads
    try:
        subprocess.run([sys.executable, "-c", SAVER, url, "1", *extra], check=True, capture_output=True)
        timing = subprocess.Popen([sys.executable, "-c", SAVER, url, "2", *extra], stdout=subprocess.PIPE, text=True)
        assert timing.stdout is not None and timing.stdout.readline().strip() == "saving"
        started = time.perf_counter()
        timing.wait()
        save_seconds = time.perf_counter() - started
        rows = []
        for trial in range(n):
            previous = read()
            previous_value = _value_of(previous)
            new_value = float(trial + 3)
            proc = subprocess.Popen([sys.executable, "-c", SAVER, url, str(new_value), *extra],
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "saving"
            if trial % 2:  # wait until the write is under way, then kill within 10 ms
                while not writing() and proc.poll() is None:
                    time.sleep(0.005)
                delay = rng.uniform(0.0, 0.01)
            else:  # anywhere in the save
                delay = rng.uniform(0.0, 1.1 * save_seconds)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = proc.returncode == -signal.SIGKILL
            try:
                found = _value_of(read())
            except Exception as exc:  # a loss: the URL holds no whole, verified version
                found, error = None, f"{type(exc).__name__}: {exc}"
            else:
                error = None
            left = uploads()
            whole = found in (previous_value, new_value)
            # the next save to the key (not killed) must clean up what the killed one left behind
            subprocess.run([sys.executable, "-c", SAVER, url, str(new_value), *extra], check=True, capture_output=True)
            left_after = uploads()
            rows.append({"trial": trial, "delay_s": round(delay, 3), "killed": killed,
                         "version": "new" if found == new_value else "previous" if found == previous_value else "none",
                         "left_behind": left, "left_after_next_save": left_after,
                         "loss": not whole or left_after > 0, "error": error})
        return {"backend": backend, "trials": n, "save_seconds": round(save_seconds, 2),
                "killed": sum(r["killed"] for r in rows),
                "killed_mid_save": sum(r["killed"] and r["left_behind"] > 0 for r in rows),
                "losses": sum(r["loss"] for r in rows), "rows": rows}
    finally:
        if server is not None:
            server.stop()


def _checkpoint_step(url: str) -> int:
    import adapterkit

    try:
        return int(json.loads(adapterkit.inspect(url).metadata["checkpoint"])["step"])
    except Exception:  # not written yet (or being replaced)
        return -1


def resume_trials(n: int, seed: int, steps: int) -> dict[str, Any]:
    import adapterkit

    rng = random.Random(seed)
    work = tempfile.mkdtemp(prefix="resume-")
    with open(f"{work}/crash_model.py", "w") as f:
        f.write(MODEL_MODULE)
    env = {**os.environ, "PYTHONPATH": work + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}

    def config(name: str) -> str:
        path = f"{work}/{name}.toml"
        with open(path, "w") as f:
            f.write(TRAIN_CONFIG.format(steps=steps, checkpoint=f"{work}/{name}.ckpt.safetensors",
                                        adapter=f"{work}/{name}.safetensors"))
        return path

    def train(path: str, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "adapterkit", "train", path, "--no-progress", *args],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    reference = train(config("reference"))
    reference_out = reference.communicate()[0]
    assert reference.returncode == 0, reference_out
    expected = adapterkit.load_tensors(f"{work}/reference.safetensors")
    rows = []
    for trial in range(n):
        path = config(f"trial{trial}")
        checkpoint = f"{work}/trial{trial}.ckpt.safetensors"
        proc = train(path)
        target = rng.randrange(5, steps, 5)  # kill once this checkpoint is written, before the next
        while proc.poll() is None and _checkpoint_step(checkpoint) < target:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = json.loads(adapterkit.inspect(checkpoint).metadata["checkpoint"])["step"]
        resumed = train(path, "--resume")
        out = resumed.communicate()[0]
        got = adapterkit.load_tensors(f"{work}/trial{trial}.safetensors") if resumed.returncode == 0 else {}
        same = got.keys() == expected.keys() and all(bool((got[k] == expected[k]).all()) for k in expected)
        rows.append({"trial": trial, "killed": proc.returncode == -signal.SIGKILL, "checkpoint_step": step,
                     "resumed_ok": resumed.returncode == 0, "bit_identical": same, "loss": not same,
                     "error": None if resumed.returncode == 0 else out.strip().splitlines()[-1]})
    return {"trials": n, "steps": steps, "losses": sum(r["loss"] for r in rows), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--resume-trials", type=int, default=6)
    parser.add_argument("--out", help="folder for crash_trials.json")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    n, m = (2, 1) if args.quick else (args.trials, args.resume_trials)
    started = time.perf_counter()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the moto server's request log
    report = {
        "save": [save_trials("local", n, seed=0), save_trials("s3", n, seed=1)],
        "resume": resume_trials(m, seed=2, steps=20 if args.quick else 40),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    for row in report["save"]:
        print(f"save/{row['backend']:<5}: {row['trials']} trials, {row['killed']} killed before the save returned, "
              f"{row['killed_mid_save']} of them with a partial write left behind "
              f"(save takes {row['save_seconds']} s), {row['losses']} losses")
    resume = report["resume"]
    steps = sorted({r["checkpoint_step"] for r in resume["rows"]})
    print(f"train/resume: {resume['trials']} trials (killed after checkpoints at steps {steps}), "
          f"{resume['losses']} losses")
    print(f"{report['seconds']} s in all")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "crash_trials.json"), "w") as f:
            json.dump(report, f, indent=1)
    if any(r["losses"] for r in report["save"]) or resume["losses"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
