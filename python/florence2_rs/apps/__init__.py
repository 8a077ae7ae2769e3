"""Applications built on the transformers-shaped classes: the `florence2` command (`cli`), the labeling loop that
it, the Ray Data example and the server share (`labeling`, with a score beside each box), labeling at scale with
Ray Data (`ray_labeling`) and pictures of the answers (`draw`).

Dependencies point one way: these modules import the library's modules, which never import them (nor does the
top level `florence2_rs`). Import each from its module: `from florence2_rs.apps.draw import draw`.
"""
