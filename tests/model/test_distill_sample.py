"""duo_model part 2 (issue 8): DCD distillation, the few-step sampler, generative evaluation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from duo_model import ops
from duo_model.checkpoint import CheckpointError, load_model, read_checkpoint
from duo_model.cli import main
from duo_model.config import ConfigError, build
from duo_model.data import prepare_data
from duo_model.distill import DCD_ALPHA_RANGE, DCDLoss, DistillConfig, distill, dt_at, round_steps, validation_kl
from duo_model.dit import DiT
from duo_model.eval import EvalConfig, evaluate_samples, generative_perplexity, load_judge, unigram_entropy
from duo_model.sample import RECIPES, SampleConfig, generate, resolve_recipe, sample_checkpoint, sampling_plan
from duo_kernels.reference import gamma_window
from duo_model.train import train
from tests.model.helpers import tiny_config


@pytest.fixture(scope="module")
def runs(corpus, cache, tmp_path_factory):
    """A tiny Duo run (curriculum then discrete) and a tiny AR judge on the generated corpus."""
    root = tmp_path_factory.mktemp("runs")
    torch.set_num_threads(1)
    train(tiny_config(corpus, root / "duo", cache, max_steps=60, curriculum_end=20, lr=3e-3))
    train(tiny_config(corpus, root / "judge", cache, algo="ar", max_steps=60, lr=3e-3))
    return root


def distill_config(runs, cache, out_dir, **overrides) -> DistillConfig:
    settings = dict(init=str(runs / "duo"), out_dir=str(out_dir), cache_dir=str(cache), max_steps=12,
                    rounds=3, final_dt=1 / 2, batch_size=8, lr=1e-3, warmup_steps=1, log_every=4, eval_every=0,
                    eval_batches=2, save_every=0, progress=False, num_threads=1, seed=5)
    settings.update(overrides)
    return DistillConfig(**settings)


# ------------------------------------------------------------------------------------------------
# distillation

def test_dt_schedule_is_the_published_formula():
    """The published code's dt = 2^(step // update_teacher_every) / T with T = 512 and rounds of 10 000
    steps is final_dt=1/32, rounds=5 over 50 000 steps; an uneven split ends on final_dt."""
    cfg = DistillConfig(final_dt=1 / 32, rounds=5, max_steps=50_000)
    steps = range(0, 50_000, 997)
    assert [dt_at(cfg, s) for s in steps] == [2 ** (s // 10_000) / 512 for s in steps]
    assert round_steps(cfg) == 10_000
    uneven = DistillConfig(final_dt=1 / 8, rounds=3, max_steps=10)
    assert round_steps(uneven) == 4 and [dt_at(uneven, s) * 32 for s in range(10)] == [1] * 4 + [2] * 4 + [4] * 2
    linear = DistillConfig(linear_growth_dt=True, max_steps=100)
    assert dt_at(linear, 0) == pytest.approx(0.001) and dt_at(linear, 50) == pytest.approx(0.1255)


def test_time_shift_and_teacher_dropout(runs, monkeypatch):
    """time_shift=up takes (t + dt, t) clipped at 1, down takes (t, t - dt) clipped at 0, both mapped
    into the gamma window; with teacher_dropout the teacher runs in training mode (dropout on) while
    the student trains, else in eval mode."""
    student, _ = load_model(runs / "duo")
    teacher, _ = load_model(runs / "duo")
    seen = []
    pair = ops.gaussian_argmax_pair

    def spy(x0, gamma_t, gamma_s, *args, **kwargs):
        seen.append(gamma_t.tolist() + gamma_s.tolist())
        return pair(x0, gamma_t, gamma_s, *args, **kwargs)

    monkeypatch.setattr(ops, "gaussian_argmax_pair", spy)
    x0 = torch.randint(0, 259, (3, 16))
    t = torch.tensor([0.001, 0.5, 0.9])
    for shift in ("up", "down"):
        DCDLoss(student, teacher, gamma_min=-3.0, gamma_max=2.0, time_shift=shift)(x0, t, 0.25, seed=1)
    gamma = lambda u: [-3.0 + 5.0 * v for v in u]  # noqa: E731
    assert seen[0] == pytest.approx(gamma([0.251, 0.75, 1.0, 0.001, 0.5, 0.75]))
    assert seen[1] == pytest.approx(gamma([0.001, 0.5, 0.9, 0.0, 0.25, 0.65]))

    for teacher_dropout, training in ((True, True), (True, False), (False, True)):
        objective = DCDLoss(student, teacher, gamma_min=-3.0, gamma_max=2.0, teacher_dropout=teacher_dropout)
        student.train(training)
        with torch.no_grad():
            objective(x0, t, 0.25, seed=1)
        assert teacher.training == (teacher_dropout and training)


def test_distillation_reduces_the_student_teacher_kl(runs):
    """A few AdamW steps on the DCD loss against a frozen teacher lower the KL on held-out sequences
    (same times and noise before and after); at dt = 0 with equal weights the KL is ~0."""
    torch.manual_seed(0)
    student, info = load_model(runs / "duo")
    teacher, _ = load_model(runs / "duo")
    # gamma window from alpha = 0.94 to 0.0065 at V = 259 (bytes): noisy enough for the KL to matter
    objective = DCDLoss(student, teacher, gamma_min=-3.0, gamma_max=2.0)
    saved = info["config"]["train"]
    data = prepare_data(corpus=saved["corpus"], tokenizer=info["tokenizer"], seq_len=saved["seq_len"],
                        val_fraction=saved["val_fraction"], cache=saved["cache_dir"])
    dt = 0.25
    kwargs = dict(batch_size=8, seed=11, device=torch.device("cpu"), max_batches=2)
    same = validation_kl(objective, data.validation, 0.0, **kwargs)["val_kl"]
    assert abs(same) < 1e-5
    before = validation_kl(objective, data.validation, dt, **kwargs)["val_kl"]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.train()
    for step in range(30):
        x0 = data.train[(8 * step) % (len(data.train) - 8):][:8]
        loss = objective(x0, torch.rand(8) * 0.999 + 1e-3, dt, seed=step).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = validation_kl(objective, data.validation, dt, **kwargs)["val_kl"]
    assert after < 0.8 * before, (before, after)


def test_distill_run_writes_a_sampleable_checkpoint_and_resumes_exactly(runs, cache, tmp_path):
    """12 steps in one go equal a run stopped after its step-6 checkpoint then resumed (mid-round: the
    teacher comes from the checkpoint); the metrics show dt doubling; the result samples and evaluates
    like a trained run. Resuming with another schedule is an error."""
    full = distill(distill_config(runs, cache, tmp_path / "full"))
    distill(distill_config(runs, cache, tmp_path / "split", save_every=6, keep_checkpoints=0))
    checkpoints = tmp_path / "split" / "checkpoints"
    shutil.rmtree(checkpoints / "step-00000012")
    pointer = json.loads((checkpoints / "latest.json").read_text())
    (checkpoints / "latest.json").write_text(json.dumps({**pointer, "step": 6, "path": "step-00000006"}))
    with pytest.raises(CheckpointError, match="resume with the same ones"):
        distill(distill_config(runs, cache, tmp_path / "split", max_steps=24), resume=True)
    resumed = distill(distill_config(runs, cache, tmp_path / "split", save_every=6), resume=True)
    a, b = read_checkpoint(tmp_path / "full"), read_checkpoint(tmp_path / "split")
    for name in ("model", "ema", "teacher"):
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=1e-5, atol=1e-6)
    assert resumed["val_kl"] == pytest.approx(full["val_kl"], rel=1e-5)
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [line["dt"] for line in lines if "loss" in line] == [1 / 8, 2 / 8, 4 / 8]
    model, info = load_model(tmp_path / "full")
    assert info["config"]["train"]["algo"] == "duo" and "distill" in info["config"]
    ids, _ = generate(model, num_samples=2, seq_len=16, steps=4, seed=0)
    assert ids.shape == (2, 16)


def test_student_ema_and_noise_window_options(runs, cache, tmp_path):
    """student_ema=carry continues the checkpoint's EMA (its update count too), restart starts it at the
    student's weights; with no gamma window given, the run uses gamma_window of DCD's alpha range."""
    base = read_checkpoint(runs / "duo")
    n = base["state"]["ema_updates"]
    kwargs = dict(max_steps=1, rounds=1, lr=1e-30, init_weights="raw")  # the student stays at its start
    distill(distill_config(runs, cache, tmp_path / "carry", student_ema="carry", **kwargs))
    distill(distill_config(runs, cache, tmp_path / "restart", **kwargs))
    carry, restart = read_checkpoint(tmp_path / "carry"), read_checkpoint(tmp_path / "restart")
    decay = (1 + n) / (10 + n)
    for key in base["model"]:
        torch.testing.assert_close(restart["ema"][key], base["model"][key])
        torch.testing.assert_close(carry["ema"][key], decay * base["ema"][key] + (1 - decay) * base["model"][key])
    assert carry["state"]["ema_updates"] == n + 1 and restart["state"]["ema_updates"] == 1
    saved = carry["config"]["distill"]
    assert (saved["gamma_min"], saved["gamma_max"]) == gamma_window(259, *DCD_ALPHA_RANGE)
    assert base["config"]["train"]["gamma_min"] == gamma_window(259, 0.95, 0.05)[0]


def test_distill_errors(runs, cache, tmp_path):
    with pytest.raises(ConfigError, match="init="):
        distill(distill_config(runs, cache, tmp_path / "a", init=""))
    with pytest.raises(ConfigError, match="init=.*missing does not exist"):
        distill(distill_config(runs, cache, tmp_path / "b", init=str(tmp_path / "missing")))
    with pytest.raises(CheckpointError, match="init=.*: no checkpoint"):
        distill(distill_config(runs, cache, tmp_path / "b", init=str(tmp_path)))
    with pytest.raises(CheckpointError, match="algo=ar"):
        distill(distill_config(runs, cache, tmp_path / "c", init=str(runs / "judge")))
    with pytest.raises(ConfigError, match="rounds=13 exceeds max_steps=12"):
        distill(distill_config(runs, cache, tmp_path / "d", rounds=13))
    with pytest.raises(ConfigError, match=r"final_dt=0.0: must lie in \(0, 1\]"):
        distill(distill_config(runs, cache, tmp_path / "e", final_dt=0.0))
    with pytest.raises(ConfigError, match="give both gamma_min and gamma_max"):
        distill(distill_config(runs, cache, tmp_path / "f", gamma_min=-3.0))
    with pytest.raises(ConfigError, match="time_shift='sideways': choose one of up, down"):
        build(DistillConfig, None, ["time_shift=sideways"], command="distill")


# ------------------------------------------------------------------------------------------------
# sampling

def test_sampling_with_a_fixed_seed_is_reproducible(runs):
    model, _ = load_model(runs / "duo")
    for recipe in ("ancestral", "max-rescale", "loop"):
        for noise_removal in ("greedy", "ancestral", "none"):
            kwargs = dict(num_samples=3, seq_len=12, steps=5, recipe=RECIPES[recipe], noise_removal=noise_removal,
                          batch_size=2)
            a, stats = generate(model, seed=7, **kwargs)
            b, _ = generate(model, seed=7, **kwargs)
            c, _ = generate(model, seed=8, **kwargs)
            assert torch.equal(a, b)
            # (the Greedy-Tail of this barely trained model maps every position to one id, whatever the seed)
            assert noise_removal == "greedy" or not torch.equal(a, c)
            assert stats["nfe"] == 5 + (noise_removal != "none")
            assert a.min() >= 0 and a.max() < model.config.vocab_size


def test_sampler_uses_the_fused_step_and_matches_the_reference_sampler(runs):
    """The loop gives the same ids through the fused ops and through the reference ops (one seed)."""
    model, _ = load_model(runs / "duo")
    kwargs = dict(num_samples=2, seq_len=10, steps=4, recipe=RECIPES["max-capped"], seed=3)
    fused, _ = generate(model, **kwargs)
    try:
        ops.use("reference")
        reference, _ = generate(model, **kwargs)
    finally:
        ops.use("auto")
    assert torch.equal(fused, reference)


def test_psi_recipe_reproduces_the_worked_example():
    """duo-math §6.4, duo_loop_remdm at 256 steps: n = 257, n_hi = 116, n_mid = 128, n_low = 13, c = 0.1,
    middle kappa = 1 - 0.01 / (1 - 0.9001) = 0.8999, kappa = 1 in the posterior segments."""
    ts, kappa = sampling_plan(RECIPES["loop"], 256)
    assert ts.numel() == 257
    torch.testing.assert_close(ts[:116], torch.linspace(1, 0.1, 116, dtype=torch.float64))
    assert torch.all(ts[116:244] == ts[116]) and float(ts[116]) == pytest.approx(0.1, abs=1e-12)
    torch.testing.assert_close(ts[244:], torch.linspace(0.1, 1e-5, 13, dtype=torch.float64))
    assert torch.all(kappa[:116] == 1) and torch.all(kappa[244:] == 1)
    middle = 1 - 0.01 / (1 - (1 - (1 - 1e-3) * 0.1))
    torch.testing.assert_close(kappa[116:243], torch.full((127,), middle, dtype=torch.float64))
    assert middle == pytest.approx(0.8999, abs=1e-4) and float(kappa[243]) == 1.0
    assert RECIPES["loop"].top_p == 0.95


def test_recipe_overrides():
    cfg = SampleConfig(recipe="loop", kappa="pure-pc", top_p=0.5)
    recipe = resolve_recipe(cfg)
    assert recipe.kappa == "pure-pc" and recipe.top_p == 0.5 and recipe.profile.startswith("linear-constant")
    assert resolve_recipe(SampleConfig(kappa="pure-posterior,constant-0.5,pure-posterior", high_frac=0.3,
                                       middle_frac=0.3)).kappa[1] == "constant-0.5"
    with pytest.raises(ConfigError, match="sampler"):
        sampling_plan(resolve_recipe(SampleConfig(kappa="sometimes")), 8)


# ------------------------------------------------------------------------------------------------
# generative evaluation and the command line

def test_gen_eval_of_samples(runs, tmp_path, capsys):
    out = tmp_path / "s.json"
    summary = sample_checkpoint(str(runs / "duo"), SampleConfig(steps=4, num_samples=4, out=str(out), batch_size=4,
                                                                           noise_removal="ancestral"))
    assert summary["nfe"] == 5 and summary["tokens_per_s"] > 0
    record = json.loads(out.read_text())
    assert len(record["samples"]) == 4 and len(record["samples"][0]["ids"]) == 32
    result = evaluate_samples(str(out), EvalConfig(judge=str(runs / "judge")))
    assert result["gen_ppl"] > 1 and result["gen_tokens"] > 0 and 0 < result["entropy"] <= torch.log(torch.tensor(32.))
    assert main(["eval", "--gen", str(out), f"judge={runs / 'judge'}"]) == 0
    assert json.loads(capsys.readouterr().out)["gen_ppl"] == pytest.approx(result["gen_ppl"])


def test_gen_ppl_is_the_judges_cross_entropy(runs):
    """Gen PPL of texts the judge's own tokenizer round-trips is exp of the AR loss on [BOS] + ids."""
    judge = load_judge(str(runs / "judge"), torch.device("cpu"))
    texts = ["the cat sees the sun.\nthe king", "a dog"]
    got = generative_perplexity(texts, judge)
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([[judge.tokenizer.bos_id] + judge.tokenizer.encode(text)])
        logits = judge.model(ids[:, :-1], torch.zeros(1))
        nll += float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").detach())
        count += ids.shape[1] - 1
    assert got["gen_tokens"] == count
    assert got["gen_nll"] == pytest.approx(nll / count, rel=1e-5)


def test_unigram_entropy():
    ids = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])
    assert unigram_entropy(ids) == pytest.approx(0.5 * torch.log(torch.tensor(2.0)).item())


def test_missing_judge_or_checkpoint_is_a_clear_error(runs, tmp_path, capsys):
    model_run = str(runs / "duo")
    with pytest.raises(ConfigError, match="needs judge="):
        load_judge("", torch.device("cpu"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_judge(str(tmp_path / "nowhere"), torch.device("cpu"))
    with pytest.raises(CheckpointError, match="must be autoregressive"):
        load_judge(model_run, torch.device("cpu"))
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="transformers"):
            load_judge("hf:gpt2-large", torch.device("cpu"))
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_samples(str(tmp_path / "none.json"), EvalConfig(judge=str(runs / "judge")))
    assert main(["sample", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="samples Duo models"):  # `duo sample` sends AR runs to ar_sample
        sample_checkpoint(str(runs / "judge"), SampleConfig(out=str(tmp_path / "x.json")))
