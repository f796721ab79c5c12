"""verifiers' plugin module for the environment id `alphazero-llm-trainer` (vf-eval imports it by that name).

The environment lives in orchestrator/verifiers_env/environment.py; this file only gives it the importable name that
verifiers >=0.4 derives from the id. Needs the `verifiers` extra: pip install -e '.[verifiers]'.
"""

from orchestrator.verifiers_env.environment import AnswerHarness, ProblemEnv, ProblemTaskset, load_environment

__all__ = ["AnswerHarness", "ProblemEnv", "ProblemTaskset", "load_environment"]
