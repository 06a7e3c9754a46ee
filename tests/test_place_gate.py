"""The place gate (``--place-open``): the place head's projector rows held at zero, with no
gradient, until a point of stage 2, then ramped back and freed."""
import pytest
import torch

from mmaccel.embedded.place_gate import PlaceGate, gate_level, parse_place_open
from mmaccel.embedded.train import TrainConfig, parse_args, train
from conftest import COLOR_IMAGES, tiny_train_config


def test_gate_level_ramps_between_start_and_end():
    assert [gate_level(p, 0.5, 0.7) for p in (0.0, 0.49, 0.6, 0.7, 0.9)] == pytest.approx([0, 0, 0.5, 1, 1])
    assert gate_level(0.999, 1.0, 1.0) == 0.0  # 1:1 never opens inside a run
    assert gate_level(0.0, 0.0, 0.0) == 1.0


@pytest.mark.parametrize("text", ["0.7:0.5", "0.5", "0.2:1.5", "a:b", "-0.1:0.5"])
def test_bad_place_open_is_refused(text):
    with pytest.raises(ValueError, match="START:END"):
        parse_place_open(text)


def _step(layer, gate, progress):
    opened = gate.set(progress)
    layer.zero_grad()
    layer(torch.ones(3, 4)).pow(2).sum().backward()
    return opened


def test_closed_rows_are_zero_and_get_no_gradient_then_ramp_back_and_train():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 6)
    stage1 = layer.weight.detach().clone(), layer.bias.detach().clone()
    rows = slice(2, 4)
    gate = PlaceGate(layer, rows, 0.5, 0.7)
    assert not _step(layer, gate, 0.1)
    assert torch.all(layer.weight[rows] == 0) and torch.all(layer.bias[rows] == 0)
    assert torch.all(layer.weight.grad[rows] == 0) and torch.all(layer.bias.grad[rows] == 0)
    assert torch.equal(layer.weight[:2], stage1[0][:2]) and layer.weight.grad[:2].abs().sum() > 0
    layer.weight.data[rows] += 1.0  # what an optimiser's weight decay might do: the next set undoes it
    assert not _step(layer, gate, 0.6)
    assert torch.allclose(layer.weight[rows], 0.5 * stage1[0][rows]) and torch.all(layer.weight.grad[rows] == 0)
    assert _step(layer, gate, 0.7) and not gate.closed
    assert torch.equal(layer.weight[rows], stage1[0][rows]) and layer.weight.grad[rows].abs().sum() > 0
    assert not _step(layer, gate, 0.8)  # open for good: set() no longer touches the rows
    layer.weight.data[rows] += 1.0
    gate.set(0.9)
    assert torch.equal(layer.weight[rows], stage1[0][rows] + 1.0)


def test_place_open_needs_the_place_head_on_a_channel_slice():
    with pytest.raises(ValueError, match="--vision-ordinal"):
        TrainConfig(place_open=(0.5, 0.6))
    with pytest.raises(ValueError, match="--vision-ordinal"):
        TrainConfig(vision_ordinal=True, place_open=(0.5, 0.6))  # 0 channels: the head reads all of them
    cfg, _ = parse_args(["--out", "x", "--vision-ordinal", "--vision-ordinal-channels", "16",
                         "--vision-facts-from", "64", "--place-open", "0.5:0.6"])
    assert cfg.place_open == (0.5, 0.6) and TrainConfig().place_open == ()


def _tiny_run(place_open, steps=4, ranks=1):
    cfg = tiny_train_config(steps=steps, data_parallel=ranks, batch_size=2 * ranks, vision_steps=2, vision_ordinal=True,
                            vision_ordinal_channels=16, vision_facts_from=64, place_open=place_open)
    lines = []
    model, _, _ = train(cfg, log=lines.append, groups=COLOR_IMAGES)
    return model.model.multi_modal_projector.linear_2, lines


def test_a_never_opened_gate_trains_and_saves_zero_rows_and_an_opened_one_says_when():
    layer, lines = _tiny_run((1.0, 1.0))
    assert torch.all(layer.weight[64:80] == 0) and torch.all(layer.bias[64:80] == 0)
    assert layer.weight[80:96].abs().sum() > 0 and not any("place channels open" in line for line in lines)
    layer.zero_grad()
    layer(torch.ones(1, layer.in_features)).sum().backward()  # the hooks are gone after the run
    assert layer.weight.grad[64:80].abs().sum() > 0
    layer, lines = _tiny_run((0.5, 0.5))
    assert layer.weight[64:80].abs().sum() > 0
    # progress (step - warmup) / (steps - warmup): step 3 of 4 is the first at 0.5 or more
    assert any(line.endswith("place channels open from step 3 (progress 0.667)") for line in lines)


def test_the_gate_holds_in_data_parallel_ranks():
    """Each rank gates its own replica the same way, so the returned weights keep the zero rows."""
    layer, _ = _tiny_run((1.0, 1.0), ranks=2)
    assert torch.all(layer.weight[64:80] == 0) and torch.all(layer.bias[64:80] == 0)
    assert layer.weight[80:96].abs().sum() > 0
