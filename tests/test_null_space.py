"""`rsft.null_space`: every step's update is projected off the directions the retain texts' activations use
(mergeedit.editing.null_space). Hand-worked projections, the exact invariance it promises (a retain text whose
activations span fewer directions than a layer is wide comes out of training unchanged), and the recipe key."""

from __future__ import annotations

import json

import pytest
import torch
from test_recipe_controls import _recipe, _tiny

from mergeedit.editing.null_space import NullSpaceProjector, Projection, projection_from_moment
from mergeedit.pipeline.runner import RecipeRun

# 3 texts of 4 tokens (the tiny tokenizer adds no BOS): 12 input positions, fewer than the tiny model's width (32)
SHORT_RETAIN = [{"prompt": f"w{i}", "text": f"w{i} w{i + 9} w{i + 17} the"} for i in (1, 2, 3)]


def test_projection_keeps_the_fewest_top_directions_holding_the_energy():
    k = torch.diag(torch.tensor([9.0, 1.0, 0.0], dtype=torch.float64))
    p, taken = projection_from_moment(k, 0.85)  # 9 / 10 = 0.9 >= 0.85: one direction held
    assert taken == 1 and torch.equal(p, torch.diag(torch.tensor([0.0, 1.0, 1.0])))
    p, taken = projection_from_moment(k, 0.9)  # exactly reached counts
    assert taken == 1
    p, taken = projection_from_moment(k, 0.95)  # needs the second: 10 / 10
    assert taken == 2 and torch.equal(p, torch.diag(torch.tensor([0.0, 0.0, 1.0])))
    # a rotated moment gives the rotated projection: P = I - u u^T for its top eigenvector u
    q, _ = torch.linalg.qr(torch.tensor([[1.0, 2.0, 0.0], [2.0, -1.0, 1.0], [0.0, 1.0, 3.0]], dtype=torch.float64))
    p, taken = projection_from_moment(q @ k @ q.T, 0.85)
    u = q[:, :1]
    assert taken == 1 and torch.allclose(p.double(), torch.eye(3, dtype=torch.float64) - u @ u.T, atol=1e-6)
    with pytest.raises(Exception, match="energy must be in"):
        projection_from_moment(k, 1.0)


def test_project_is_w0_plus_the_projected_delta():
    lin = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    named = {"w": lin.weight}
    eye = torch.eye(3)
    # P = diag(0, 1, 1), stored either way: the held direction e1, or the free ones e2, e3
    for projection in (Projection(eye[:, :1], held=True, taken=1), Projection(eye[:, 1:], held=False, taken=1)):
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        proj = NullSpaceProjector({"w": projection}, 0.9, 10, [])
        proj.start(named)
        with torch.no_grad():
            lin.weight.add_(torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]))
        proj.project(named)
        # the first input direction is held: its column keeps W0's values, the others keep the update
        assert torch.equal(lin.weight.detach(), torch.tensor([[1.0, 22.0, 33.0], [4.0, 55.0, 66.0]]))
        lin.weight.grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        proj.project_grads(named)  # before the optimizer step: the held direction's gradient is dropped
        assert torch.equal(lin.weight.grad, torch.tensor([[0.0, 2.0, 3.0], [0.0, 5.0, 6.0]]))
        lin.weight.grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
        proj.project_grads(named, torch.bfloat16)  # these numbers and this basis are exact in bf16: the same result
        assert lin.weight.grad.dtype == torch.float32 and torch.equal(lin.weight.grad, torch.tensor([[0.0, 2.0, 3.0], [0.0, 5.0, 6.0]]))
        d = proj.describe()
        assert d["held_directions"] == {"w": 1} and d["free_directions"] == {"w": 2} and d["free_share"] == pytest.approx(2 / 3)


def test_the_stored_side_is_the_smaller_and_gives_p():
    """A Projection keeps the held directions when they are at most half, else the free ones; either way x P equals
    the full P = I - U U^T of projection_from_moment (float32 rounding)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 8, generator=g, dtype=torch.float64)
    k = a.T @ (a * torch.linspace(0.1, 10.0, 40, dtype=torch.float64)[:, None])
    x = torch.randn(5, 8, generator=g)
    for energy in (0.3, 0.99):
        p, taken = projection_from_moment(k, energy)
        proj = Projection.from_moment(k, energy)
        r = proj.basis.shape[1]
        assert proj.taken == taken and r == min(taken, 8 - taken) and proj.held == (taken <= 4)
        assert torch.allclose(proj.matrix(), p, atol=1e-5) and torch.allclose(proj.apply(x), x @ p, atol=1e-5)
    assert Projection.from_moment(k, 0.3).held and not Projection.from_moment(k, 0.99).held


def test_gradients_projected_in_bf16_never_move_the_weights_along_the_held_directions():
    """`project_grads(named, bf16)` (the training's autocast precision) gives grad P to bf16's rounding, a part in a few
    hundred of the gradient; the weight projection after the step stays float32, so after Adam steps on such gradients
    the update is off the held directions to float32's rounding, as with float32 gradients."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 24, generator=g, dtype=torch.float64)
    k = a.T @ (a * torch.linspace(0.1, 10.0, 64, dtype=torch.float64)[:, None])
    for energy in (0.3, 0.95):  # held stored (few held directions) and free stored (many)
        projection = Projection.from_moment(k, energy)
        held = torch.linalg.eigh(k)[1].flip(1)[:, : projection.taken].float()
        lin = torch.nn.Linear(24, 16, bias=False)
        named = {"w": lin.weight}
        proj = NullSpaceProjector({"w": projection}, energy, 64, [])
        proj.start(named)
        w0 = lin.weight.detach().clone()
        opt = torch.optim.Adam([lin.weight], lr=1e-2)
        for _ in range(5):
            grad = torch.randn(16, 24, generator=g)
            exact = grad @ projection.matrix()
            lin.weight.grad = grad.clone()
            proj.project_grads(named, torch.bfloat16)
            assert lin.weight.grad.dtype == torch.float32
            error = float((lin.weight.grad - exact).abs().max())
            assert 0 < error < 2e-2 * float(grad.abs().max()), error  # rounded (not float32's result), to bf16's precision
            opt.step()
            proj.project(named)
        update = lin.weight.detach() - w0
        assert float(update.abs().max()) > 1e-2  # it moved
        assert float((update @ held).abs().max()) < 1e-5, float((update @ held).abs().max())  # but not along U


def _retain_logits(model_dir, texts) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.cat([model(**tok(t, return_tensors="pt")).logits[0] for t in texts])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny-ns") / "model")


def test_a_retain_text_narrower_than_the_layers_comes_out_of_training_unchanged(tmp_path, tiny, run_cli, monkeypatch):
    """12 retain positions span at most 12 of the 32 (and 64) input directions of every MLP matrix. Held with an
    energy of 1 - 1e-9, every trained matrix computes what it did on those inputs, layer after layer: the retain texts'
    logits are the unedited model's, while the edits are still learned in the 20 (or more) directions left. With the
    KL's weight 0 and no `merge: {auto}`, nothing reads the base's distributions, so none are computed."""
    import mergeedit.editing.retain as retain_module
    from mergeedit.editing.retain import RetainKL

    kl_builds, tokenized = [], []
    real = RetainKL.from_groups.__func__
    monkeypatch.setattr(RetainKL, "from_groups", classmethod(lambda cls, *a, **k: kl_builds.append(1) or real(cls, *a, **k)))
    real_ids = retain_module.retain_token_ids
    monkeypatch.setattr(retain_module, "retain_token_ids", lambda *a, **k: tokenized.append(1) or real_ids(*a, **k))
    texts = [r["text"] for r in SHORT_RETAIN]
    common = {"schedule": "breadth-first", "max_epochs": 12, "lr": 0.02}

    def run(name, **rsft):
        folder = tmp_path / name
        recipe = _recipe(folder, tiny, rsft={**common, **rsft})
        (folder / "retain.jsonl").write_text("\n".join(json.dumps(r) for r in SHORT_RETAIN) + "\n")
        return recipe, RecipeRun(recipe).run()

    before = _retain_logits(tiny, texts)
    _, free = run("free", retain={"weight": 0.0, "path": "retain.jsonl"})
    recipe, held = run("held", retain={"weight": 0.0, "path": "retain.jsonl"}, null_space={"energy": 1 - 1e-9})
    moved = float((_retain_logits(free.model_dir, texts) - before).abs().max())
    kept = float((_retain_logits(held.model_dir, texts) - before).abs().max())
    assert moved > 0.1 and kept < 1e-3 * moved, (moved, kept)
    report = held.train_reports[0]["null_space"]
    assert report["positions"] == 12 and report["not_projected"] == []
    for name, h in report["held_directions"].items():  # each matrix held at most as many directions as there are positions
        assert 1 <= h <= 12 and report["free_directions"][name] == (64 if "down_proj" in name else 32) - h
    losses = [r["losses"] for r in (free.train_reports[0], held.train_reports[0])]
    assert losses[1][-1] < 0.5 * losses[1][0]  # the edits are still learned in the free directions
    assert free.train_reports[0]["null_space"] == {}
    assert kl_builds == [] and tokenized == [1]
    run("held-kl", retain={"weight": 0.5, "path": "retain.jsonl"}, null_space={"energy": 1 - 1e-9})
    assert kl_builds == [1] and tokenized == [1, 1]  # the KL term reads them: built once; the texts tokenized once per run
    assert any(n.startswith("null space: every update kept off") for n in held.notes) and not any(n.startswith("null space") for n in free.notes)
    shown = run_cli("plan", recipe)
    assert shown.code == 0 and "null space: every step's update of each trained Linear matrix is projected off" in shown.stdout, shown.stdout
    card = (held.model_dir / "README.md").read_text()
    assert "Null space (`rsft.null_space`)" in card and "activations (`retain.jsonl`, measured on the unedited model)" in card, card


@pytest.mark.parametrize("bad, needle", [
    ({"null_space": {"energy": 1.0}}, "rsft.null_space.energy"),
    ({"null_space": {"energy": 0}}, "rsft.null_space.energy"),
    ({"null_space": {"rank": 3}}, "rsft.null_space.rank"),
])
def test_bad_null_space_settings_are_one_located_line_exit_2(tmp_path, tiny, run_cli, bad, needle):
    recipe = _recipe(tmp_path, tiny, rsft=bad)
    got = run_cli("validate", recipe)
    assert got.code == 2 and needle in got.stderr and "Traceback" not in got.stderr, got.stderr
    assert len(got.stderr.strip().splitlines()) == 1


def test_gate_and_up_share_one_moment_and_one_projection(tiny):
    """An MLP's gate and up projections read the same input tensor: one K (accumulated once) and one P serve both;
    down reads another input and gets its own. K is the plain sum of x x^T over the non-padding positions."""
    from transformers import AutoModelForCausalLM

    from mergeedit.editing.null_space import input_second_moments

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    names = [f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    moments, positions = input_second_moments(model, names, [batch])
    gate, up, down = (moments[n] for n in names)
    assert positions == 6 and gate is up and down is not gate and gate.shape == (32, 32) and down.shape == (64, 64)
    seen = []
    hook = model.model.layers[1].mlp.gate_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    x = seen[0][batch["attention_mask"].bool()].double()
    assert torch.allclose(gate, x.T @ x, rtol=1e-9, atol=1e-9)
    proj = NullSpaceProjector.build(model, names, [batch], 0.9)
    assert proj.projections[names[0]] is proj.projections[names[1]] and proj.projections[names[2]].size == 64
    for n in (names[0], names[2]):  # each is the P of its own moment
        assert torch.allclose(proj.projections[n].matrix(), projection_from_moment(moments[n], 0.9)[0], atol=1e-5)


def _moments_by_full_forwards(model, names, batches):
    """The reference: every input each named Linear reads in whole forwards, summed as x^T x over non-padding rows."""
    modules = dict(model.named_modules())
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [modules[n.rpartition(".")[0]].register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach())) for n in names]
    out = {n: 0 for n in names}
    with torch.no_grad():
        for b in batches:
            for n in names:
                seen[n].clear()
            model(**b)
            for n in names:
                for x in seen[n]:
                    rows = x[b["attention_mask"].bool()].double()
                    out[n] = out[n] + rows.T @ rows
    for h in hooks:
        h.remove()
    return out


def test_moments_stop_each_forward_after_the_last_trained_matrix(tiny):
    """After the first batch, a forward stops once the last trained matrix (layer 0's) has read its input: the layers
    above and the output layer run once in all, not once per batch. The moments equal those summed from whole
    forwards. A trained module that runs twice in one forward (one MLP shared by two layers) keeps every forward whole,
    and both of its inputs count."""
    from transformers import AutoModelForCausalLM

    from mergeedit.editing.null_space import input_second_moments

    names = [f"model.layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    batches = []
    for rows in ([[5, 6, 7, 8], [9, 10, 0, 0]], [[11, 12, 13, 0], [14, 15, 16, 17]], [[18, 19, 0, 0], [20, 21, 22, 0]]):
        ids = torch.tensor(rows)
        batches.append({"input_ids": ids, "attention_mask": (ids != 0).long()})
    for shared in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny).eval()
        if shared:
            model.model.layers[1].mlp = model.model.layers[0].mlp
        heads = []
        hook = model.lm_head.register_forward_hook(lambda *_, heads=heads: heads.append(1))
        moments, positions = input_second_moments(model, names, batches)
        hook.remove()
        assert positions == 6 + 7 + 5
        assert len(heads) == (3 if shared else 1), (shared, len(heads))
        want = _moments_by_full_forwards(model, names, batches)
        for n in names:
            assert torch.allclose(moments[n], want[n], rtol=1e-12, atol=1e-12), (shared, n)


def test_plan_counts_one_projection_per_distinct_input():
    """`mergeedit plan`'s memory estimate: at most in x in/2 float32 per input tensor the trained weights read (the
    smaller side of its eigenbasis). gate/up share the MLP's input and q/k/v the attention's; o_proj and down_proj
    read their own: 4 * (32*16 + 64*32 + 32*16 + 32*16) = 14,336 bytes. Norms (1-D) are not projected; with
    null_space off the term is 0."""
    from types import SimpleNamespace

    from mergeedit.pipeline.planning import null_space_bytes
    from mergeedit.pipeline.recipe import RsftSection

    shapes = {"mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32), "mlp.down_proj": (32, 64), "self_attn.q_proj": (32, 32),
              "self_attn.k_proj": (16, 32), "self_attn.v_proj": (16, 32), "self_attn.o_proj": (32, 32)}
    tensors = {f"model.layers.3.{k}.weight": SimpleNamespace(shape=v) for k, v in shapes.items()}
    tensors["model.layers.3.input_layernorm.weight"] = SimpleNamespace(shape=(32,))
    source = SimpleNamespace(tensors=tensors)
    on = SimpleNamespace(rsft=RsftSection.model_validate({}))
    off = SimpleNamespace(rsft=RsftSection.model_validate({"null_space": None}))
    assert null_space_bytes(on, source, list(tensors)) == 4 * (32 * 16 + 64 * 32 + 32 * 16 + 32 * 16) == 14_336
    assert null_space_bytes(on, source, ["model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight"]) == 4 * 32 * 16
    assert null_space_bytes(off, source, list(tensors)) == 0


def test_the_plans_input_groups_are_the_ones_the_projection_finds(tiny):
    """`mergeedit plan` groups weights by name (io.architecture.input_key) to bound the projections' memory; at run time
    the projector shares one moment between weights that read the same tensor. On a Llama-shaped model, every 2-D
    weight of a layer (q/k/v/o, gate/up/down): the two groupings are the same partition."""
    from transformers import AutoModelForCausalLM

    from mergeedit.editing.null_space import input_second_moments
    from mergeedit.io.architecture import input_key

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    names = [n for n, p in model.named_parameters() if n.startswith("model.layers.1.") and p.dim() == 2]
    assert len(names) == 7
    ids = torch.tensor([[5, 6, 7, 8]])
    moments, _ = input_second_moments(model, names, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    by_identity = sorted(sorted(n for n in names if moments[n] is moments[m]) for m in names)
    by_name = sorted(sorted(n for n in names if input_key(n) == input_key(m)) for m in names)
    assert by_identity == by_name
    assert sum(1 for g in {tuple(g) for g in by_name}) == 4  # q/k/v, o, gate/up, down


def test_retain_batches_without_a_forward_are_the_kls_batches(tiny):
    """The null space alone reads only the padded retain batches (`retain_batches`, no forward); they are the
    batches `RetainKL.build` pads and runs, tensor for tensor, in the same order."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergeedit.editing.retain import RetainKL, retain_batches

    model = AutoModelForCausalLM.from_pretrained(tiny).eval()
    tok = AutoTokenizer.from_pretrained(tiny)
    texts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11 w12 w13", "w14 w15 w16 w17"]
    kl = RetainKL.build(model, tok, texts, batch_size=2, max_tokens=4)
    alone = retain_batches(tok, texts, batch_size=2, max_tokens=4)
    assert len(alone) == len(kl.batches()) == 3
    for a, b in zip(alone, kl.batches()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
