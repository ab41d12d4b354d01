"""prune_eval.models.transfer: the weights arrive byte for byte, whatever the chunking and thread count.

The pinned-buffer path itself needs a GPU, which CI does not have: benchmarks/weight_transfer.py
compares every tensor it moved with `model.to("cuda")`'s (BENCHMARKS.md, "Moving the weights to the
GPU"), and the GPU sweeps' mean F1 values are those of the runs before it (0.6712 / 0.6710)."""

import pytest
import torch

from prune_eval.models import tiny
from prune_eval.models.transfer import chunks, copy_chunks, move_to_device, swap_tensors


def sources() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(33, 17, generator=generator).half(),
        torch.randn(5, generator=generator).to(torch.bfloat16),
        torch.randint(0, 2, (13,), generator=generator).bool(),
        torch.randint(-9, 9, (3, 4, 5), generator=generator),
        torch.randn(7, 9, generator=generator).t(),  # not contiguous
        torch.empty(0),
        torch.tensor(3.5),
    ]


@pytest.mark.parametrize("chunk_bytes,threads", [(7, 3), (64, 1), (1 << 20, 4), (1, 2)])
def test_chunked_copies_reproduce_every_tensor(chunk_bytes, threads):
    pairs = [(t, torch.empty_like(t, memory_format=torch.contiguous_format)) for t in sources()]
    work = list(chunks(pairs, chunk_bytes))
    assert all(0 < length <= chunk_bytes for _, _, _, length in work)
    assert sum(length for _, _, _, length in work) == sum(t.numel() * t.element_size() for t, _ in pairs)
    copy_chunks(work, torch.device("cpu"), threads=threads, chunk_bytes=chunk_bytes)
    for source, target in pairs:
        assert target.dtype == source.dtype and target.shape == source.shape
        assert torch.equal(target, source)


def tied_model():
    model = tiny.build_model(tiny.build_config(), init_seed=0)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model


def test_swapped_in_copies_are_the_models_tensors_and_shared_ones_stay_shared():
    # CPU to CPU takes the path CUDA takes in Module._apply (param.data = target): the bookkeeping
    # move_to_device does after its copies, with data to compare
    model = tied_model()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    tensors = list({id(t): t for t in list(model.parameters()) + list(model.buffers())}.values())
    targets = {id(t): torch.empty_like(t) for t in tensors}
    copy_chunks(list(chunks([(t.detach(), targets[id(t)]) for t in tensors], 1000)), torch.device("cpu"), threads=3, chunk_bytes=1000)
    names = [n for n, _ in model.named_parameters()]
    assert swap_tensors(model, targets) is model
    moved = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert [n for n, _ in model.named_parameters()] == names  # the tied weight still listed once
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    target_pointers = {t.data_ptr() for t in targets.values()}
    assert all(t.data_ptr() in target_pointers for t in moved.values())
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())


def test_move_to_device_moves_every_parameter_and_buffer_as_to_does():
    # "meta" is another device on a machine without a GPU: the chunked path end to end (no data)
    expected, model = tied_model().to("meta"), tied_model()
    moved = move_to_device(model, torch.device("meta"))
    assert moved is model
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"meta"}
    assert [(n, t.shape, t.dtype) for n, t in model.state_dict().items()] == [(n, t.shape, t.dtype) for n, t in expected.state_dict().items()]


def test_move_to_the_device_it_is_on_changes_nothing():
    model = tiny.build_model(tiny.build_config(), init_seed=0)
    pointers = {name: t.data_ptr() for name, t in model.state_dict().items()}
    assert move_to_device(model, torch.device("cpu")) is model
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == pointers


def test_a_failing_copy_stops_the_others_and_is_raised():
    class Broken(Exception):
        pass

    class BrokenTarget:  # a target whose slices refuse to be written
        def __getitem__(self, _):
            raise Broken("no")

    source = torch.arange(100, dtype=torch.uint8)
    good = torch.zeros(100, dtype=torch.uint8)
    work = [(source, BrokenTarget(), 0, 10)] + [(source, good, offset, 10) for offset in range(0, 100, 10)]
    with pytest.raises(Broken):
        copy_chunks(work, torch.device("cpu"), threads=1, chunk_bytes=10)
    assert not good.any()  # one thread: the first chunk failed, no other chunk was taken
