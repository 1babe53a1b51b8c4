"""Speed benchmark of MoLE-Flow: ``python -m moleflow.benchmark --weights random|pretrained``.

``synthetic`` generates an MVTec-AD-sized dataset; ``limits`` measures the backbone alone, a
FrEIA-style reference flow alone and our flow alone, in the same process as the run they are
compared with; ``timing`` runs the main configuration end to end with every phase timed;
``__main__`` prints each figure as a ratio to its limit and the goals, and writes all as JSON.
"""
