"""Predictives: link approximations from a Gaussian over logits to class
probabilities (:mod:`laplace.predictive.links`) and the predictive surface every
Laplace class shares (:mod:`laplace.predictive.surface`)."""

from laplace.predictive.links import bridge_probs, glm_link, mc_probs, probit_probs

__all__ = ["glm_link", "probit_probs", "bridge_probs", "mc_probs"]
