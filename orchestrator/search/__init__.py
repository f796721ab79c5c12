"""One search tree per problem: async MCTS over the student and the teachers, rewards and terminal checks."""
