"""What every cellvi model adds to :class:`scvi.model.base.BaseModelClass`.

Three inherited methods of the reference pages fail in scvi-tools 1.4 for any model:
``view_registry`` and ``update_setup_method_args`` read and write a ``self._registry`` that models
do not have (AttributeError), and ``view_anndata_setup`` / ``view_setup_args`` call ``rich.pretty``
without importing it. ``deregister_manager`` also raises for an AnnData that was registered through
the model (a ``get_*(adata)`` call or ``transfer_fields``) rather than by ``setup_anndata``.
"""

from __future__ import annotations

import rich
import rich.pretty
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data._constants import _SCVI_UUID_KEY, _SCVI_VERSION_KEY, _SETUP_ARGS_KEY


class RegistryMixin:
    """Working registry methods for a :class:`~scvi.model.base.BaseModelClass` model."""

    def view_registry(self, hide_state_registries: bool = False) -> None:
        """Prints summary of the registry.

        (The model's AnnData registry, or the saved registry of a model loaded without its AnnData.)

        Parameters
        ----------
        hide_state_registries
            If True, prints a shortened summary without details of each state registry.
        """
        if self._adata_manager is not None:
            self._adata_manager.view_registry(hide_state_registries=hide_state_registries)
            return
        rich.print(f"Anndata setup with scvi-tools version {self.registry_.get(_SCVI_VERSION_KEY)}.")
        AnnDataManager.view_setup_method_args(self.registry_)
        rich.print(
            AnnDataManager._view_summary_stats(
                AnnDataManager._get_summary_stats_from_registry(self.registry_)
            )
        )

    def update_setup_method_args(self, setup_method_args: dict) -> None:
        """Update setup method args.

        Parameters
        ----------
        setup_method_args
            This is a bit of a misnomer, this is a dict representing kwargs of the setup method that
            will be used to update the existing values in the registry of this instance.
        """
        if not isinstance(setup_method_args, dict):
            raise TypeError(f"setup_method_args must be a dict, got {type(setup_method_args).__name__}.")
        self.registry_[_SETUP_ARGS_KEY].update(setup_method_args)

    def deregister_manager(self, adata: AnnData | None = None) -> None:
        """Deregisters the :class:`~scvi.data.AnnDataManager` instance associated with `adata`.

        If `adata` is `None`, deregisters all :class:`~scvi.data.AnnDataManager` instances in both
        the class and instance-specific manager stores, except for the one associated with this
        model instance. An AnnData registered only with this model (through a ``get_*`` call or
        :meth:`transfer_fields`) is deregistered too.
        """
        if adata is not None:
            uuid = adata.uns.get(_SCVI_UUID_KEY)
            own = self._per_instance_manager_store.get(self.id, {})
            if uuid is not None and uuid not in self._setup_adata_manager_store and uuid in own:
                del own[uuid]
                return
        super().deregister_manager(adata)
