import os
import subprocess
import sys

import torch

HERE = os.path.dirname(__file__)


def test_two_process_torchrun_matches_one_process(tmp_path):
    """CLIP, PSD and SigLIP (open_clip's exchange of text features round the ranks) losses and gradients, and the
    trainer's step with and without --accum, 1 vs 2 gloo ranks."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # the one-process run and the 2-process one at once (each in a folder of its own: the checks write beside out)
    (tmp_path / "1").mkdir()
    one = tmp_path / "1" / "one.pt"
    alone = subprocess.Popen([sys.executable, os.path.join(HERE, "ddp_check.py"), str(one)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", os.path.join(HERE, "ddp_check.py"), str(two)],
                       env=env, timeout=300, capture_output=True, text=True)
    _, err = alone.communicate(timeout=300)
    assert alone.returncode == 0, err[-3000:]
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
    for loss in ("clip", "psd", "siglip", "psd-one", "psd-accum", "siglip-one", "siglip-accum", "bank-one", "bank-accum",
                 "oracle-one", "oracle-accum"):
        for k in a[loss]:
            assert torch.allclose(a[loss][k], b[loss][k], atol=1e-6, rtol=1e-5), (loss, k, a[loss][k], b[loss][k])
    assert not torch.allclose(a["clip"]["loss"], a["psd"]["loss"])
    rank1 = torch.load(f"{two}.rank1", weights_only=True)
    other = rank1["finite"]  # rank 1's own loss was finite
    assert not bool(other["nan on rank 0"]) and bool(other["finite everywhere"])
    for r in (b, rank1):  # one collective a step: every rank sees rank 0's NaN and rank 1's stop signal
        assert r["flags"]["stop on rank 1"].tolist() == [True, True]
        assert r["flags"]["nan on rank 0"].tolist() == [False, False]
        assert r["chosen"].endswith("step_000002.pt")  # rank 0's choice, broadcast
        assert r["node_local"].startswith("error: ") and "rank(s) 1 cannot see" in r["node_local"]
    assert a["chosen"].endswith("step_000002.pt") and a["node_local"].endswith("step_000005.pt")  # one process
    assert not any(".tmp-" in n for n in os.listdir(tmp_path / "shared" / "checkpoints"))
    assert set(a["siglip-one"]) >= {"loss", "logit_bias", "logit_scale"}  # the bias learns
    assert not torch.allclose(a["bank-one"]["loss"], a["psd-one"]["loss"])  # the bank's teacher is its own
    assert not torch.allclose(a["oracle-one"]["loss"], a["psd-one"]["loss"])
    for name in ("psd", "siglip", "bank", "oracle"):  # feature-cache accumulation = the whole batch at once, in 1 and in 2 processes
        for k in a[f"{name}-one"]:
            for r in (a, b):
                assert torch.allclose(r[f"{name}-accum"][k], r[f"{name}-one"][k], atol=1e-6, rtol=1e-5), (name, k)
