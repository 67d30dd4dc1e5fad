"""Downstream evaluation with EleutherAI's lm-evaluation-harness, per loop count and exit rule
(the Ouro paper's benchmark tables and its Fig. 5 Pareto curves): tasks.py loads tasks,
harness_lm.py answers lm-eval's requests with our model, run.py evaluates every setting,
report.py writes results, table and plot. `pretrain eval --tasks` and the training callback
(callbacks/downstream.py) are its two users. lm-eval is imported only here (extra `eval`)."""
