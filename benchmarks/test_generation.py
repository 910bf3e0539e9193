"""benchmarks/generation.py must not rot: a tiny run with random weights, and one that scores the
samples of trained (tiny) runs under a judge."""

import json

import torch

from benchmarks import generation
from duo_model.train import train
from tests.model.helpers import tiny_config, write_corpus


def _cells(result, **match):
    return [c for c in result["cells"] if all(c[k] == v for k, v in match.items())]


def test_smoke_run_writes_table_json_and_plot(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = generation.main(["--smoke", "--threads", "1", "--repeats", "1", "--out", str(tmp_path),
                                  "--max-token-calls", "200"])
    finally:
        torch.set_num_threads(threads)
    # AR plus 3 Duo samplers at 2 step counts, at 2 batch sizes; 8 steps x B=2 x L=16 = 256 > 200: skipped
    assert len(result["cells"]) == 2 * (1 + 3 * 2)
    assert all(c["seconds"] > 0 for c in _cells(result, B=1))
    assert all("skipped" in c for c in _cells(result, B=2, steps=8))
    ar = _cells(result, sampler="AR", B=1)[0]
    assert ar["calls"] == 15 and ar["tokens_per_s"] > 0
    summary = {(s["L"], s["B"]): s for s in result["summary"]}
    assert summary[(16, 1)]["ar_over_duo8_cpu"] > 0 and summary[(16, 2)]["ar_over_duo8_wall"] is None
    assert json.loads((tmp_path / "generation.json").read_text())["environment"]["torch_threads"] == 1
    assert "| 16 | 2 | Duo fused, Greedy-Tail | 8 | 9 | skipped" in (tmp_path / "generation.md").read_text()
    assert (tmp_path / "generation.png").stat().st_size > 0


def test_trained_runs_get_gen_ppl_and_entropy(tmp_path):
    threads = torch.get_num_threads()
    corpus = write_corpus(tmp_path / "corpus", documents=2, sentences=100)
    try:
        for name, algo in (("duo", "duo"), ("ar", "ar")):
            train(tiny_config(corpus, tmp_path / name, tmp_path / "cache", algo=algo, max_steps=2, seq_len=16))
        result = generation.main(["--smoke", "--repeats", "1", "--duo", str(tmp_path / "duo"), "--ar",
                                  str(tmp_path / "ar"), "--judge", str(tmp_path / "ar"), "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    scored = [c for c in result["cells"] if "gen_ppl" in c]
    assert {c["B"] for c in scored} == {2} and len(scored) == 1 + 3 * 2  # the batch-2 samples of every sampler
    assert all(c["gen_ppl"] > 1 and 0 < c["entropy"] < 3 for c in scored)  # 16 tokens: entropy <= log 16
