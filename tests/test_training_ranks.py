"""Distributed training's randomness and the training step's device traffic, through the real
training step (`diffusion.training.train_step`) without Ray: two gloo ranks in two processes
draw their own flips, t, noise and dropout, a resumed run draws what an uninterrupted one draws,
and the step reads nothing from the host."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusion import speed
from diffusion.checkpoint import checkpoint_dir_name, read_checkpoint, restore_state, save_checkpoint
from diffusion.config import RECIPES
from diffusion.schedule import NoiseSchedule
from diffusion.speed import fast_cuda_kernels, use_bf16
from diffusion.training import build_state, train_step
from helpers import free_port

# The digits UNet (8x8 grey) with dropout and flips on: every kind of training draw.
CONFIG = RECIPES["digits"].replace(batch_size=4, dropout=0.1, flip=True, warmup_steps=1)
STEPS, CHECKPOINT_AT = 4, 2


def one_rank(rank: int, port: int, folder: str, start: int) -> None:
    """Train ranks 0 and 1 of 2 from `start` (0, or the checkpoint of that step) to STEPS on the
    same batch, rank 0 checkpointing at CHECKPOINT_AT; save what the UNet was called with."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    state = build_state(CONFIG, torch.device("cpu"), rank)
    if start:
        restore_state(read_checkpoint(os.path.join(folder, checkpoint_dir_name(start))), state)
    calls = []  # (x_t, t) of each step: x_t carries the flips and the noise
    state.model.register_forward_pre_hook(lambda _, args: calls.append((args[0].detach().clone(), args[1].clone())))
    net = DistributedDataParallel(state.model)
    x0 = torch.linspace(-1, 1, 4 * 64).view(4, 1, 8, 8)  # not left-right symmetric: flips show
    while state.step < STEPS:
        train_step(state, net, x0, CONFIG)
        if rank == 0 and state.step == CHECKPOINT_AT:
            save_checkpoint(os.path.join(folder, checkpoint_dir_name(state.step)), state, CONFIG)
        dist.barrier()
    torch.save({"calls": calls, "model": state.model.state_dict()}, os.path.join(folder, f"from{start}-rank{rank}.pt"))
    dist.destroy_process_group()


def run_ranks(folder, start: int) -> list[dict]:
    mp.spawn(one_rank, args=(free_port(), str(folder), start), nprocs=2)
    return [torch.load(folder / f"from{start}-rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def test_ranks_draw_their_own_noise_and_a_resume_draws_what_an_uninterrupted_run_draws(tmp_path):
    whole = run_ranks(tmp_path, 0)
    resumed = run_ranks(tmp_path, CHECKPOINT_AT)
    for step in range(STEPS):  # the same batch on both ranks: only their draws differ
        (x0, t0), (x1, t1) = whole[0]["calls"][step], whole[1]["calls"][step]
        assert not torch.equal(t0, t1) and not torch.equal(x0, x1)
    for rank in (0, 1):
        after = whole[rank]["calls"][CHECKPOINT_AT:]
        assert len(resumed[rank]["calls"]) == len(after) == STEPS - CHECKPOINT_AT
        for (x, t), (x_resumed, t_resumed) in zip(after, resumed[rank]["calls"]):
            assert torch.equal(t, t_resumed) and torch.equal(x, x_resumed)
        # dropout too: the weights after the resumed steps are the uninterrupted run's, bit for bit
        for name, value in whole[rank]["model"].items():
            assert torch.equal(value, resumed[rank]["model"][name]), name
    # DDP kept the two ranks' weights identical while their draws differed
    assert all(torch.equal(v, whole[1]["model"][k]) for k, v in whole[0]["model"].items())


class HostToDevice(TorchDispatchMode):
    """Records every op that reads a host tensor (more than a scalar) into a tensor elsewhere."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(a.device.type == "cpu" and a.dim() > 0 for a in inputs) and any(o.device.type != "cpu" for o in outputs):
            self.ops.append(str(func))
        return out


def test_the_training_step_reads_nothing_from_the_host():
    """On the meta device (a stand-in for a GPU that has no memory behind it: any host read
    shows, and .item() would fail), a training step copies nothing from the CPU to the device."""
    meta = torch.device("meta")
    state = build_state(CONFIG, meta)
    x0 = torch.zeros(4, 1, 8, 8, device=meta)
    train_step(state, state.model, x0, CONFIG)  # the first step creates Adam's state
    with HostToDevice() as traffic:
        train_step(state, state.model, x0, CONFIG)
    assert traffic.ops == []
    # The same step with the schedule left on the host copies it every step: what the check sees.
    state.schedule = NoiseSchedule.from_name(CONFIG.schedule, CONFIG.num_timesteps)
    with HostToDevice() as traffic:
        train_step(state, state.model, x0, CONFIG)
    assert any("_to_copy" in op for op in traffic.ops), traffic.ops


def test_precision_decides_the_autocast_of_a_training_step_on_any_device(monkeypatch):
    """--precision auto is bf16 on CUDA, and for training on a CPU with native bf16 (AMX or AVX-512 BF16);
    fp32 elsewhere and for sampling on every CPU. bf16 asked for trains under bf16 autocast on a
    CPU too (its convolutions in bf16), and fp32 without; their losses agree to bf16's precision."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: native)
        assert use_bf16("auto", cuda) and use_bf16("auto", cuda, training=True) and not use_bf16("auto", cpu)
        assert use_bf16("auto", cpu, training=True) == native
        assert use_bf16("bf16", cpu) and not use_bf16("fp32", cuda) and not use_bf16("fp32", cpu, training=True)
    seen, losses = [], []
    x0 = torch.linspace(-1, 1, 4 * 64).view(4, 1, 8, 8)
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        state = build_state(CONFIG, torch.device("cpu"))
        state.model.conv_in.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        train_step(state, state.model, x0, CONFIG, bf16)  # the output layer starts at zero: eps-hat 0 in both
        loss, _ = train_step(state, state.model, x0, CONFIG, bf16)
        assert seen.pop() == dtype and seen.pop() == dtype and not seen and torch.isfinite(loss)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=2e-2) and losses[0] != losses[1]  # bf16: 8 bits of mantissa


def test_fast_cuda_kernels_turns_on_autotuning_and_tf32():
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        fast_cuda_kernels()
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])
