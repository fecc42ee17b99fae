"""The naive reference (W1): what the service replaced.

An `async def` endpoint that builds an EmailMessage and sends it over a fresh smtplib
connection per request, on the event loop, storing nothing. Kept only to be measured.
"""

import os
import smtplib
import ssl
from email.message import EmailMessage
from typing import Any

from fastapi import FastAPI

app = FastAPI()
HOST = os.environ["SMTP_HOST"]
PORT = int(os.environ["SMTP_PORT"])
SECURITY = os.environ.get("SMTP_SECURITY", "none")
USER = os.environ.get("SMTP_USER")
PASSWORD = os.environ.get("SMTP_PASSWORD", "")
CA_FILE = os.environ.get("SMTP_CA_FILE")


@app.post("/notify/email")
async def notify_email(data: dict[str, Any]) -> dict[str, str]:
    message = EmailMessage()
    message["From"] = "noreply@coworking.local"
    message["To"] = data["email"]
    message["Subject"] = data["subject"]
    message.set_content(data["text"])
    with smtplib.SMTP(HOST, PORT) as smtp:  # blocks the event loop, as the original did
        if SECURITY == "starttls":
            smtp.starttls(context=ssl.create_default_context(cafile=CA_FILE))
        if USER:
            smtp.login(USER, PASSWORD)
        smtp.send_message(message)
    return {"status": "sent"}
