"""As modules/ui_extra_networks.py (v1.10): the extra-networks pages (Lora, ...) under each generation
tab, with the behaviour that decides when a new LoRA's card shows:

- `create_ui` gives each page a gr.HTML, filled by `interface.load` from `ui.pages_contents`, which is
  rendered once (at the first page load) and handed unchanged to every later page load;
- each page has a hidden refresh button (`{tabname}_{page}_extra_refresh_internal`, pressed by the
  WebUI's own JavaScript from the refresh icon) whose handler calls every page's `refresh()`, renders
  the HTML again and stores it as the new `pages_contents`.

So a LoRA added after the first page load is listed by `networks.available_networks` (the API) but has
no card until that handler runs. Cards are reduced to what the tests read: one element per item with
its name."""

import html

import gradio as gr

extra_pages = []


def register_page(page):
    """Registers an extra networks page for the UI (extensions do it in on_before_ui)."""
    extra_pages.append(page)


class ExtraNetworksPage:
    def __init__(self, title):
        self.title = title
        self.name = title.lower()
        self.extra_networks_tabname = self.name.replace(" ", "_")
        self.items = {}

    def refresh(self):
        pass

    def list_items(self):
        raise NotImplementedError()

    def create_html(self, tabname, *, empty=False):
        self.items = {} if empty else {item["name"]: item for item in self.list_items()}
        cards = "".join(f"<div class='card' data-name='{html.escape(name)}'>{html.escape(name)}</div>"
                        for name in self.items)
        return (f"<div id='{tabname}_{self.extra_networks_tabname}_cards' class='extra-network-cards'>"
                f"{'Loading...' if empty else cards}</div>")


class ExtraNetworksUi:
    def __init__(self):
        self.pages = None
        self.pages_contents = None
        self.stored_extra_pages = None
        self.tabname = None


def create_ui(interface: gr.Blocks, unrelated_tabs, tabname):
    ui = ExtraNetworksUi()
    ui.pages = []
    ui.pages_contents = []
    ui.stored_extra_pages = list(extra_pages)
    ui.tabname = tabname

    def create_html():
        ui.pages_contents = [pg.create_html(ui.tabname) for pg in ui.stored_extra_pages]

    def pages_html():
        if not ui.pages_contents:
            create_html()
        return ui.pages_contents

    def refresh():
        for pg in ui.stored_extra_pages:
            pg.refresh()
        create_html()
        return ui.pages_contents

    for page in ui.stored_extra_pages:
        with gr.Tab(page.title, elem_id=f"{tabname}_{page.extra_networks_tabname}"):
            ui.pages.append(gr.HTML(page.create_html(tabname, empty=True),
                                    elem_id=f"{tabname}_{page.extra_networks_tabname}_html"))
    for page in ui.stored_extra_pages:
        button_refresh = gr.Button("Refresh", elem_id=f"{tabname}_{page.extra_networks_tabname}_extra_refresh_internal",
                                   visible=False)
        button_refresh.click(fn=refresh, inputs=[], outputs=ui.pages)

    interface.load(fn=pages_html, inputs=[], outputs=ui.pages)
    return ui
