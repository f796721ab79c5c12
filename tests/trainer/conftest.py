"""The trainer's unit tests share one tiny Student per test module."""

import pytest


@pytest.fixture(scope="module")
def student(tiny_random_model_dir, tmp_path_factory):
    pytest.importorskip("torch")
    from support.tiny_student import make_student

    return make_student(tiny_random_model_dir, tmp_path_factory.mktemp("student"))
