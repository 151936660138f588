"""``python -m obert_modifiers.zoo.server``: run the hub server."""

from obert_modifiers.zoo.server import main

main()
