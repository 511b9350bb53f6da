def test_probe(console, namespace):
    page = console.page
    ns, owner = namespace("probe")
    console.sign_in(ns, owner)
    console.create("quick", "viewer")
    print(page.evaluate("""async () => {
        const log = [];
        const d = document.getElementById("confirm-dialog");
        const ok = document.getElementById("confirm-ok");
        d.addEventListener("close", () => log.push("close"));
        ok.addEventListener("click", () => log.push("okclick open=" + d.open));
        const revoke = document.querySelector('#tokens-body button[aria-label="Revoke quick"]');
        revoke.click(); log.push("opened");
        d.close(); log.push("closed-called");
        revoke.click(); log.push("reopened " + d.open);
        await new Promise((r) => setTimeout(r, 0)); log.push("timeout");
        ok.click();
        await new Promise((r) => setTimeout(r, 500)); log.push("after " + d.open);
        return log.join(",");
    }"""))
