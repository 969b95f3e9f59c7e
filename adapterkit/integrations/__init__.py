"""Bridges to other libraries' training tools; each module imports its library lazily
(``import adapterkit`` never imports them)."""
