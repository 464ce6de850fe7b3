"""As the built-in Lora extension's ui_extra_networks_lora.py: the Lora page of the extra networks; its
refresh() lists the Lora folder again and its items are `networks.available_networks`."""

import networks
from modules import ui_extra_networks


class ExtraNetworksPageLora(ui_extra_networks.ExtraNetworksPage):
    def __init__(self):
        super().__init__("Lora")

    def refresh(self):
        networks.list_available_networks()

    def list_items(self):
        for name, filename in list(networks.available_networks.items()):
            yield {"name": name, "filename": filename, "prompt": f"<lora:{name}:1>"}
