"""Templates ``t2i-engine new-plugin`` fills in (``string.Template``: ``$name``, ``$module``)."""
