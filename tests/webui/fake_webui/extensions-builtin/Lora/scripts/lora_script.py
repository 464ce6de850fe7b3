import networks  # as in the WebUI: the module stays in sys.modules for other extensions to use
import ui_extra_networks_lora
from modules import script_callbacks, ui_extra_networks

networks.list_available_networks()


def before_ui():
    ui_extra_networks.register_page(ui_extra_networks_lora.ExtraNetworksPageLora())


script_callbacks.on_before_ui(before_ui)
