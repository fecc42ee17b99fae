"""The few HTML pages a recipient sees (one-click unsubscribe), in Russian and English.
They show nothing of the address: whoever holds a link sees the same page."""

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem;"
    "color:#222}button{font-size:1rem;padding:.6rem 1.2rem;cursor:pointer}"
)


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="ru"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="robots" content="noindex"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def confirm_unsubscribe() -> str:
    """The page a link opens: a button that unsubscribes (a POST to the same URL)."""
    return _page(
        "Отписаться · Unsubscribe",
        "<h1>Отписаться от рассылки?</h1>"
        "<p>Вы больше не будете получать такие письма. "
        '<span lang="en">You will no longer receive these emails.</span></p>'
        '<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
        '<button type="submit">Отписаться · Unsubscribe</button></form>',
    )


def unsubscribed() -> str:
    """The answer to the unsubscribe POST."""
    return _page(
        "Вы отписаны · Unsubscribed",
        "<h1>Вы отписаны</h1><p>Такие письма больше не придут. "
        '<span lang="en">You are unsubscribed.</span></p>',
    )
