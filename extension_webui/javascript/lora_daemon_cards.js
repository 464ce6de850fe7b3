// The Train LoRA tab: when a job's LoRA is ready, show its card in the Lora tab of this open page.
//
// The WebUI renders extra-networks cards once and keeps that HTML; only its hidden refresh button
// (pressed by its own refresh icon) renders them again. When the tab's "Use in a prompt" box gets a
// new <lora:...> text, this presses that button for txt2img and img2img, as the refresh icon does.
// (Pages loaded later get the card from the server side: lora_daemon_webui/host.py.)
(function () {
    "use strict";
    // A1111 1.8+ and Forge: one hidden button per page; earlier releases: one per tab
    var BUTTONS = ["lora_extra_refresh_internal", "extra_refresh"];
    var TABS = ["txt2img", "img2img"];
    var last = null;

    function root() {
        var app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }

    function pressRefresh() {
        TABS.forEach(function (tab) {
            for (var i = 0; i < BUTTONS.length; i++) {
                var button = root().querySelector("#" + tab + "_" + BUTTONS[i]);
                if (button) {
                    button.dispatchEvent(new Event("click"));
                    return;
                }
            }
        });
    }

    function check() {
        var box = root().querySelector("#lora_daemon_result textarea, #lora_daemon_result input");
        if (!box) {
            return;
        }
        var value = box.value || "";
        if (last === null || value === last) {
            last = value; // what the page was loaded with already has its card
            return;
        }
        last = value;
        if (value.indexOf("<lora:") === 0) {
            pressRefresh();
        }
    }

    setInterval(check, 1000);
})();
