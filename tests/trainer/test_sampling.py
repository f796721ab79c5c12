import pytest

torch = pytest.importorskip("torch")

from services.trainer.sampling import sample_next, top_p_filter


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, torch.tensor([0.7])))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, torch.tensor([0.01]))).sum() == 1


def test_greedy_rows_take_the_argmax_and_seeded_rows_repeat():
    logits = torch.randn(3, 50)
    default = torch.Generator().manual_seed(0)
    first = sample_next(
        logits,
        [0.0, 1.0, 1.0],
        [1.0, 0.9, 1.0],
        [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
        default,
    )
    again = sample_next(
        logits,
        [0.0, 1.0, 1.0],
        [1.0, 0.9, 1.0],
        [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)],
        default,
    )
    assert first[0] == logits[0].argmax()
    assert first.tolist() == again.tolist()
