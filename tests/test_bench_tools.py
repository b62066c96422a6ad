"""bench/draft_kernels.py, which bench/gpu_check.sh runs on a lent GPU: it must run to the end
(device time is scarce) and count what it claims to count."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))


def test_draft_kernels_counts_the_concatenated_projections(tmp_path, capsys):
    import draft_kernels

    assert draft_kernels.main(["--synthetic", "tiny", "--iters", "2", "--check", "3", "--output_dir", str(tmp_path)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain, frozen = last["rows"]
    # tiny draft: 2 layers x 7 projections + the head; frozen: q/k/v and gate/up as one product each
    assert (plain["matmuls_per_step"], frozen["matmuls_per_step"]) == (15, 9)
    assert plain["argmax_agree"] == frozen["argmax_agree"] == "3/3"
    assert plain["max_abs_logit_diff_vs_eager"] < 1e-4 and frozen["max_abs_logit_diff_vs_eager"] < 1e-4
    saved = json.loads(Path(last["path"]).read_text())
    assert saved["rows"] == last["rows"] and saved["environment"]["torch"]


def test_draft_kernels_counts_generated_kernel_calls():
    from draft_kernels import count_matmuls

    code = ["extern_kernels.mm(a, b, out=buf1)\nassert_size_stride(buf1, (1, 2), (2, 1), 'extern_kernels.mm')",
            "buf2 = torch.ops.mkl._mkl_linear.default(x, w, p, None, 1)\n"
            "assert_size_stride(buf2, (1, 2), (2, 1), 'torch.ops.mkl._mkl_linear')\nextern_kernels.addmm(c, a, b, out=buf3)"]
    assert count_matmuls(code) == 3


def test_round_ops_needs_a_gpu_for_the_real_shape_pair(capsys):
    """The shared synthetic options refuse a 14B target on a CPU before building anything."""
    import round_ops

    from c2c.app.cli import run_main

    assert run_main(round_ops.main, ["--synthetic", "qwen3", "--device", "cpu"]) == 2  # as the script runs it
    assert "needs a GPU" in capsys.readouterr().err


def test_verify_blocks_times_every_size_and_saves_them(tmp_path, capsys):
    import verify_blocks

    assert verify_blocks.main(["--synthetic", "tiny", "--device", "cpu", "--threads", "1", "--blocks", "1", "8", "32",
                               "--iters", "1", "--warmup", "0", "--output_dir", str(tmp_path)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(map(int, last["ms"]["eager"])) == [1, 8, 32] and all(v > 0 for v in last["ms"]["eager"].values())
    assert sorted(map(int, last["ms"]["draft_eager"])) == [1, 2, 4, 8]
    assert last["vs_smallest"]["eager"]["1"] == 1.0 and json.loads(Path(last["path"]).read_text())["ms"] == last["ms"]
    assert verify_blocks.main(["--synthetic", "qwen3", "--device", "cpu", "--output_dir", str(tmp_path)]) == 2
