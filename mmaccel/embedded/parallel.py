"""Data parallelism on a CPU: ``train.py --data-parallel N``, stage 2 here (stage 1's ranks run
:func:`.pretrain.stage1_loop` on the same machinery: :func:`fork_ranks`, :func:`all_reduce_gradients`,
:func:`state_bytes`).

Why: on a 2-core CPU two 1-thread processes with 8 rows each make a step 1.2-1.4x faster
than one 2-thread process with 16 rows, and an all-reduce of the gradients costs ~9 ms
(``results/recipe-cpu/step_breakdown.md``): small matmuls scale poorly over threads. Stage 2's
ranks are forked from the trainer after stage 1 (before anything is compiled: a pool forked after
inductor ran hangs), each with one thread and a gloo group over 127.0.0.1. Each rank encodes
its share of every step's drawn samples (``step_batch(part=...)``), the objective's
denominators and the gradients are summed over the ranks (``train_step(ranks=...)``), so all
ranks take the same optimiser step; rank 0 decides the wall-clock schedule and the stop, logs,
and sends the trained state back as safetensors bytes.
"""
from __future__ import annotations

import math
import pickle
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_ranks(fn, ranks: int, *args):
    """Run ``fn(rank, ranks, *args)`` in ``ranks`` forked 1-thread processes joined in a gloo
    group; return rank 0's result. A rank that fails stops the others and raises here."""
    import multiprocessing as mp

    ctx, port = mp.get_context("fork"), free_port()
    recv, send = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, ranks, port, send, args), daemon=True)
             for rank in range(ranks)]
    for p in procs:
        p.start()
    try:
        return _result_of(procs, recv)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


def _result_of(procs, recv):
    """Rank 0's result from the pipe, or RuntimeError once a rank has died without one."""
    while True:
        if recv.poll(0.2):
            return pickle.loads(recv.recv_bytes())
        failed = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
        all_done = all(p.exitcode == 0 for p in procs)
        if all_done and recv.poll(0):  # rank 0 sent and every rank exited between the poll above and here
            return pickle.loads(recv.recv_bytes())
        if failed or all_done:
            raise RuntimeError(f"data-parallel rank(s) {failed or 'all'} ended without a result "
                               f"(exit codes {[p.exitcode for p in procs]}); see the traceback above")


def _rank_main(fn, rank: int, ranks: int, port: int, send, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    try:
        out = fn(rank, ranks, *args)
        if rank == 0:  # by value (plain pickle): multiprocessing's pickler would pass a tensor's storage
            send.send_bytes(pickle.dumps(out))  # as a file descriptor that dies with this process
    finally:
        dist.destroy_process_group()


def global_totals(present, count):
    """(answered turns, answer tokens) summed over the ranks' rows: the objective's denominators."""
    import torch
    import torch.distributed as dist

    totals = torch.stack([present.sum().float(), count.sum().float()])
    dist.all_reduce(totals)
    return totals[0], totals[1]


def all_reduce_gradients(parameters) -> None:
    """Sum the trainable ones of ``parameters`` gradients over the ranks, in one flat buffer. A
    parameter no rank gave a gradient keeps ``None`` (the optimiser skips it, as one process would)."""
    import torch
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params]
    had = torch.tensor([float(p.grad is not None) for p in params])
    flat = torch.cat(grads + [had])
    dist.all_reduce(flat)
    parts = flat[:-len(params)].split([p.numel() for p in params])
    for p, g, any_rank in zip(params, parts, flat[-len(params):]):
        p.grad = g.view_as(p).clone() if any_rank > 0 else None


def agreed_schedule(prog: float, stopping: bool) -> tuple[float, bool]:
    """Rank 0's schedule position and stop decision, on every rank (wall time differs per rank)."""
    import torch
    import torch.distributed as dist

    state = torch.tensor([prog, float(stopping)], dtype=torch.float64)
    dist.broadcast(state, src=0)
    return float(state[0]), bool(state[1])


def pool_log_window(fam_loss, window: list, follow: list) -> None:
    """Make a log window's figures every rank's rows, in place (every rank calls it at the same
    steps): per-family loss sums and counts are summed, and each step's main-question and
    follow-up losses averaged over the ranks that have them. Both are means of the ranks' means:
    the main-question figure is the whole step's mean when the ranks hold equal shares of its
    rows (the recipe's batch of 16 draws 16, 12 or 8 rows, split evenly over 2 ranks), and only
    near it otherwise (an odd row count)."""
    import torch
    import torch.distributed as dist

    from ..world.spec import ALL_FAMILIES

    unknown = set(fam_loss.n) - set(ALL_FAMILIES)
    if unknown:
        raise ValueError(f"families {sorted(unknown)} are not in the world's ALL_FAMILIES")
    fams = torch.tensor([[fam_loss.sum.get(f, 0.0), fam_loss.n.get(f, 0)] for f in ALL_FAMILIES],
                        dtype=torch.float64)
    steps = torch.tensor([[w, 0.0 if math.isnan(f) else f, float(not math.isnan(f))] for w, f in zip(window, follow)],
                         dtype=torch.float64).reshape(-1, 3)
    flat = torch.cat([fams.flatten(), steps.flatten()])  # one all-reduce for both
    dist.all_reduce(flat)
    fams, steps = flat[: fams.numel()].view_as(fams), flat[fams.numel():].view_as(steps)
    fam_loss.sum.clear()
    fam_loss.n.clear()
    for name, (total, n) in zip(ALL_FAMILIES, fams.tolist()):
        if n:
            fam_loss.sum[name], fam_loss.n[name] = total, int(n)
    window[:] = (steps[:, 0] / dist.get_world_size()).tolist()
    follow[:] = [total / n if n else math.nan for total, n in steps[:, 1:].tolist()]


def stage2_rank(rank: int, ranks: int, model, processor, cfg, log, groups, budget):
    """One rank's stage 2 (:func:`.train.run_loop`); rank 0 returns (state bytes, history)."""
    import torch._inductor.config as inductor_config

    from .train import compiled_language_model, make_optimizer, run_loop

    inductor_config.compile_threads = 1  # no compile pool inside a forked rank
    opt = make_optimizer(model, cfg)
    with compiled_language_model(model, cfg.compile):
        history = run_loop(model, opt, processor, cfg, log if rank == 0 else quiet_log, groups, budget, rank)
    return None if rank else (state_bytes(model), history)


def run_stage2(model, processor, cfg, log, groups, budget) -> list[dict]:
    """Stage 2 over ``cfg.data_parallel`` forked ranks; ``model`` gets the trained weights."""
    log(f"stage 2 on {cfg.data_parallel} data-parallel ranks of 1 thread, "
        f"{cfg.batch_size} rows a step split between them")
    state, history = fork_ranks(stage2_rank, cfg.data_parallel, model, processor, cfg, log, groups, budget)
    load_state_bytes(model, state)
    return history


def state_bytes(model) -> bytes:
    """A rank's trained weights as safetensors bytes, to send to the trainer by value."""
    from safetensors.torch import save

    return save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()})


def load_state_bytes(model, data: bytes) -> None:
    """The trainer's side of :func:`state_bytes`: ``model`` gets rank 0's weights."""
    from safetensors.torch import load

    model.load_state_dict(load(data))


def quiet_log(*_args, **_kwargs) -> None:
    """The log of ranks other than 0."""
