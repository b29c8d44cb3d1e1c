"""Developer tooling (image builds, local registry, stub generation), importable by tests."""
