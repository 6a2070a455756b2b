"""Tasks the project generates itself: data plus a programmatic verifier / reward."""

from ftjax.tasks import arithmetic

VERIFIERS = {"arithmetic": arithmetic.verify}
