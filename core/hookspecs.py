"""The whole extension surface of qtune: one hook per kind of thing a plugin can add.

Every hook except ``register_commands`` hands the plugin a ``register`` callback; call it once per
object you provide (a plugin may register many). The core keeps the registries, refuses a name
that two plugins claim, and records which plugin registered what (``qtune plugins``).
"""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("qtune")
hookimpl = HookimplMarker("qtune")


@hookspec
def register_templates(register):
    """Register prompt templates: ``register(template)`` with a :class:`qtune.types.PromptTemplate`."""


@hookspec
def register_dataset_loaders(register):
    """Register dataset loaders: ``register(loader)`` with a :class:`qtune.types.DatasetLoader`."""


@hookspec
def register_data_formats(register):
    """Register dataset row formats: ``register(data_format)`` with a :class:`qtune.types.DataFormat`."""


@hookspec
def register_models(register):
    """Register catalogue models: ``register(entry)`` with a :class:`qtune.types.ModelEntry`."""


@hookspec
def register_backends(register):
    """Register model backends: ``register(backend)`` with a :class:`qtune.types.Backend`."""


@hookspec
def register_callbacks(register):
    """Register training callbacks: ``register(callback_class)``, a :class:`qtune.types.TrainingCallback` subclass."""


@hookspec
def register_trackers(register):
    """Register experiment trackers (``training.report_to``): ``register(tracker)`` with a :class:`qtune.types.Tracker`."""


@hookspec
def register_exporters(register):
    """Register exporters: ``register(exporter)`` with a :class:`qtune.types.Exporter`."""


@hookspec
def register_commands(cli):
    """Add commands to the ``qtune`` Click group ``cli``; import heavy modules inside the command."""
