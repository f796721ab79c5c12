from orchestrator.clients.orchestrator import parse_sse


def test_parse_sse_frames_comments_and_multiline_data():
    lines = [
        ": keep-alive",
        "",
        "id: 3",
        "event: step",
        'data: {"step": 1}',
        "",
        "id: 4",
        "event: status",
        'data: {"status":',
        'data:  "completed"}',
        "",
    ]
    events = list(parse_sse(iter(lines)))
    assert [(e.id, e.type) for e in events] == [(3, "step"), (4, "status")]
    assert events[0].data == {"step": 1} and events[1].data == {"status": "completed"}
