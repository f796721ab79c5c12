"""The orchestrator service: async MCTS over OpenAI-compatible teachers, GRPO steps on the trainer, jobs over REST.

Its packages are layers; each imports only the ones below it (tests/orchestrator/test_layers.py holds them to it):

    cli.py, __main__.py    the `azt` command line
    api/ local/ verifiers_env/
                           the REST API; the demo and the service processes on this machine; the verifiers environment
    jobs/                  the life of a job: manager, store, events, the context a running job gets
    runners/               what a job does: the train loop, the eval, trees -> GRPO groups, reports, metrics
    search/                one search tree: MCTS, tree, rewards, teachers, terminal checks
    clients/ gsm8k/        HTTP clients (OpenAI-compatible pool, trainer, this service); GSM8K data and answers
    settings.py            every setting, with the search's knobs defined once
"""
