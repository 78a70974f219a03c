"""Helpers the test files share: small diffusers models and pipelines, the tolerance rule, the native-extension
helpers. A test skips only for what it uses: importing these never skips a module."""
