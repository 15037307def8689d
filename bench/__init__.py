"""Side-by-side performance benchmarks of vlp against its peers (open_clip, faiss).

Each benchmark is ``python -m bench.<name>``: it runs our code and the peer alternately (A B A B ...), prints
a table, and prints one JSON object as its last line (also saved to ``bench/results/<name>.json``). The
ratio ``ours / peer`` of the medians measured in one run is the figure that counts; benchmarks never assert
speed. Shared helpers live in :mod:`bench.common`.
"""
