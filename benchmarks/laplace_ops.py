"""Worker side of ``scaling.py`` and ``realsize.py``: fit and GLM predictive of one
Laplace configuration, through the public API both libraries share."""

from __future__ import annotations

from harness import emit, library_version, measure


def fit_and_glm(model, loader, X_test, subset: str, structure: str, warm_up: bool):
    """``{"fit", "glm"}`` callables of a classification Laplace approximation.

    ``fit`` builds and fits a fresh approximation on ``loader``; ``glm`` predicts
    ``X_test`` (probit) with the last one fitted. With ``warm_up``, one batch is fitted
    and 8 points predicted first, so that lazy imports and first-call allocations
    of either library do not count as peak memory of the measured run.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from laplace import Laplace

    fitted = []

    def fit(data=loader):
        la = Laplace(
            model,
            "classification",
            subset_of_weights=subset,
            hessian_structure=structure,
        )
        la.fit(data)
        fitted[:] = [la]

    def glm(X=X_test):
        if not fitted:
            raise RuntimeError("no fitted posterior (the fit failed)")
        fitted[0](X, pred_type="glm", link_approx="probit")

    if warm_up:
        try:
            X, y = next(iter(loader))
            fit(DataLoader(TensorDataset(X, y), batch_size=len(X)))
            glm(X_test[:8])
        except Exception:  # the measured run reports it
            pass
        fitted.clear()
    return {"fit": fit, "glm": glm}, fitted


def run_ops(funcs: dict, fitted: list, ops, repeats: int, budget: float) -> None:
    """Measure ``ops`` in order and print one JSON row each (the fit row also
    carries the number of parameters under the posterior)."""
    info = {"laplace": library_version()}
    for op in ops:
        result = measure(funcs[op], "cpu", repeats, budget)
        if op == "fit" and fitted and "error" not in result:
            result["n_params"] = int(fitted[0].n_params)
        emit({**info, "op": op, **result})
