"""Fails at import, like a plugin whose own dependency is missing."""

raise ImportError("adapterkit_broken needs the package 'not_installed_anywhere'")
