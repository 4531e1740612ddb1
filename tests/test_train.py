import os
import socket

import pytest
import torch
from torch import nn

from pruning_lib.data import load_dataset
from pruning_lib.masks import Mask, apply_mask, prunable_names
from pruning_lib.train import Callback, evaluate, fit


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def test_fit_learns_and_records_history(tiny_data):
    m = make_mlp()
    before = evaluate(m, tiny_data.test)["accuracy"]
    h = fit(m, tiny_data, epochs=3, batch_size=30, lr=3e-3, progress=False)
    assert {"step", "epoch", "train_loss", "val_loss", "val_accuracy", "test_accuracy", "seconds"} <= set(h)
    assert h["step"].iloc[0] == 0 and h["step"].iloc[-1] == 3 * 7
    assert h["test_accuracy"].iloc[-1] > max(before, 0.5)


def test_fit_is_deterministic_on_cpu(tiny_data):
    a, b = make_mlp(), make_mlp()
    fit(a, tiny_data, iterations=10, batch_size=30, seed=3, progress=False)
    fit(b, tiny_data, iterations=10, batch_size=30, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_penalties_and_callbacks_plug_in(tiny_data):
    seen = {"backward": 0, "step": 0, "epoch": 0}

    class Count(Callback):
        def after_backward(self, s): seen["backward"] += 1
        def after_step(self, s): seen["step"] += 1
        def after_epoch(self, s): seen["epoch"] += 1
        def log(self, s): return {"calls": seen["step"]}

    m = make_mlp()
    norm0 = m[1].weight.norm()
    h = fit(m, tiny_data, epochs=2, batch_size=30, lr=1e-2, progress=False, callbacks=[Count()],
            penalties={"l2": lambda model: 10.0 * model[1].weight.pow(2).sum()})
    assert seen == {"backward": 14, "step": 14, "epoch": 2}
    assert "l2" in h and "calls" in h
    assert m[1].weight.norm() < 0.5 * norm0  # the penalty reached the gradient


def test_fit_keeps_mask_through_adam(tiny_data):
    m = make_mlp()
    g = torch.Generator().manual_seed(0)
    params = dict(m.named_parameters())
    mask = Mask({n: torch.rand(params[n].shape, generator=g) < 0.3 for n in prunable_names(m)})
    apply_mask(m, mask)
    fit(m, tiny_data, epochs=2, batch_size=30, progress=False)
    for n, keep in mask.items():
        assert torch.all(params[n][~keep] == 0)


def test_interrupted_fit_resumes_to_the_same_model(tiny_data, tmp_path):
    ref = make_mlp()
    h_ref = fit(ref, tiny_data, epochs=4, batch_size=30, seed=1, progress=False)

    class Interrupt(Callback):
        def after_step(self, s):
            if s.step == 17:  # in the middle of the third epoch
                raise KeyboardInterrupt

    m = make_mlp()
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(m, tiny_data, epochs=4, batch_size=30, seed=1, progress=False, checkpoint=ckpt,
            callbacks=[Interrupt()])
    assert ckpt.exists() and torch.load(ckpt, weights_only=False)["step"] == 14
    m2 = make_mlp(seed=99)  # a fresh process would build a new model; the checkpoint replaces it
    h = fit(m2, tiny_data, epochs=4, batch_size=30, seed=1, progress=False, checkpoint=ckpt)
    assert all(torch.allclose(p, q) for p, q in zip(ref.parameters(), m2.parameters()))
    assert h["step"].tolist() == h_ref["step"].tolist()
    # a finished run loads from its checkpoint and does no more steps
    h2 = fit(make_mlp(), tiny_data, epochs=4, batch_size=30, seed=1, progress=False, checkpoint=ckpt)
    assert len(h2) == len(h)


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    data = load_dataset("synthetic-mnist", n=300)
    m = make_mlp()
    fit(m, data, epochs=2, batch_size=30, progress=False, eval_test=False,
        optimizer=torch.optim.SGD(m.parameters(), lr=0.1))
    if rank == 0:
        torch.save(m.state_dict(), out)
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=True)
    data = load_dataset("synthetic-mnist", n=300)
    single = make_mlp()
    fit(single, data, epochs=2, batch_size=30, progress=False, eval_test=False,
        optimizer=torch.optim.SGD(single.parameters(), lr=0.1))
    ddp = torch.load(out, weights_only=True)
    for k, v in single.state_dict().items():
        assert torch.allclose(v, ddp[k], atol=1e-5), k


def test_a_method_plugs_into_fit_as_its_parts_do():
    """``fit(method=m)`` trains exactly as passing m's optimizers, penalties, loss and m as first callback."""
    from pruning_lib.gates import families
    from pruning_lib.methods import hard_concrete as hc
    from pruning_lib.models import build_model
    from pruning_lib.train import Method

    data = load_dataset("synthetic-mnist")

    def run(plugged: bool):
        torch.manual_seed(0)
        net = build_model("lenet300_100", **data.model_kwargs())
        families.attach("l0_hc", net)
        m = hc.HardConcretePruning(net, lambda model: 1e-3 * families.get("l0_hc").penalty(model), 0.1,
                                   name="l0")
        kw = dict(iterations=6, batch_size=32, seed=3, progress=False, eval_every=3)
        if plugged:
            h = fit(net, data, method=m, lr=1e-3, **kw)
        else:
            h = fit(net, data, optimizer=m.optimizers(1e-3), penalties=m.penalties(), callbacks=[m], **kw)
        return net, h

    a, ha = run(True)
    b, hb = run(False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert ha.drop(columns="seconds").equals(hb.drop(columns="seconds")) and "l0" in ha.columns
    # the defaults: fit's Adam on every parameter, no penalty, cross-entropy
    base = Method()
    assert base.optimizers(1e-3) is None and base.penalties() == {}


@pytest.mark.parametrize("model,kind", [("lenet300_100", "dense"), ("lenet300_100", "l0_hc"),
                                        ("lenet300_100", "dep_l0"), ("lenet300_100", "polarization"),
                                        ("lenet5_caffe", "l0_hc")])
def test_the_books_adam_computes_torchs_default_bits(model, kind):
    """pruning_lib.train.adam (foreach) against torch.optim.Adam's CPU default (the single-tensor loop): the
    same weights to the bit after 30 steps of a gated network, gates and channels-last layout included."""
    from pruning_lib.gates import families
    from pruning_lib.models import build_model
    from pruning_lib.train import adam

    torch.set_num_threads(1)
    weights = []
    for make in (lambda p: torch.optim.Adam(p, lr=1e-2), lambda p: adam(p, lr=1e-2)):
        torch.manual_seed(0)
        m = build_model(model)
        if kind != "dense":
            families.attach(kind, m)
        if model == "lenet5_caffe":
            m.to(memory_format=torch.channels_last)
        opt = make(m.parameters())
        g = torch.Generator().manual_seed(1)
        for i in range(30):
            x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
            torch.manual_seed(100 + i)  # the gates' noise
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        weights.append([p.detach().clone() for p in m.parameters()])
    assert adam([torch.zeros(1, requires_grad=True)]).defaults["foreach"] is True
    assert all(torch.equal(a, b) for a, b in zip(*weights))
