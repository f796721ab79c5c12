from orchestrator.runners.training import plan_batches


def test_plan_batches_covers_every_epoch_in_order():
    assert plan_batches(5, 2, 1) == [[0, 1], [2, 3], [4]]
    assert plan_batches(3, 2, 2) == [[0, 1], [2, 0], [1, 2]]
    assert plan_batches(1, 4, 1) == [[0]]
