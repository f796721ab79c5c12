from orchestrator.search.counters import MAX_ERRORS_KEPT, SearchCounters
from orchestrator.search.teachers import AllTeachersFailed


def test_a_failover_counts_every_teacher_tried_and_degrades_once():
    counters = SearchCounters()
    counters.teacher_answered("right", [])
    assert (counters.requests, counters.teacher_errors, counters.degraded) == (1, 0, [])
    counters.teacher_answered("right", ["a: http_500", "b: timeout"])
    counters.teacher_answered("wrong", ["a: http_500"])
    assert (counters.requests, counters.teacher_errors) == (1 + 3 + 2, 3)
    assert counters.degraded == ["teacher_failover"]
    assert counters.errors == [
        "teacher (right): a: http_500",
        "teacher (right): b: timeout",
        "teacher (wrong): a: http_500",
    ]


def test_all_teachers_failed_counts_each_and_keeps_a_bounded_error_list():
    counters = SearchCounters()
    for _ in range(MAX_ERRORS_KEPT + 10):
        counters.all_teachers_failed("right", 3, AllTeachersFailed("none left"))
    assert counters.requests == counters.teacher_errors == 3 * (MAX_ERRORS_KEPT + 10)
    assert len(counters.errors) == MAX_ERRORS_KEPT and counters.errors[0].startswith("teachers (right): ")
    assert counters.degraded == ["all_teachers_failed"]
