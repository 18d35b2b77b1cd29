"""HTTP edges of the chat: pages, the history API and the health check."""

from __future__ import annotations

import math

import redis
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET

from chat import protocol, selectors, services
from chat.client_address import client_address
from chat.forms import RoomForm
from chat.ratelimit import take_signup_token

HISTORY_MAX_LIMIT = 100


def signup(request: HttpRequest) -> HttpResponse:
    form = UserCreationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        # Only valid forms count: a mistyped password confirmation costs no sign-up.
        try:
            wait_seconds = take_signup_token(client_address(request) or "unknown")
        except redis.RedisError:
            form.add_error(None, "Sign-up is unavailable right now: Redis, which counts sign-ups, is down.")
            return render(request, "registration/signup.html", {"form": form}, status=503)
        if wait_seconds:
            minutes = max(1, math.ceil(wait_seconds / 60))
            form.add_error(
                None,
                f"Too many accounts were created from your network address. "
                f"Try again in {minutes} minute{'s' if minutes != 1 else ''}.",
            )
            return render(request, "registration/signup.html", {"form": form}, status=429)
        user = form.save()
        # The model backend by name: the axes backend listed before it only refuses locked logins.
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect("rooms")
    return render(request, "registration/signup.html", {"form": form})


@login_required
def rooms(request: HttpRequest) -> HttpResponse:
    form = RoomForm(request.POST or None)
    existing = None  # the visible room the submitted name's address belongs to, to link to
    if request.method == "POST" and form.is_valid():
        try:
            room = services.room_create(
                creator=request.user,
                name=form.cleaned_data["name"],
                is_private=form.cleaned_data["is_private"],
            )
        except services.RoomExists as error:
            form.add_error("name", str(error))
            existing = error.room
        except services.InvalidRoom as error:
            form.add_error("name", str(error))
        else:
            return redirect("room", slug=room.slug)
    visible = selectors.rooms_for_user(user=request.user)
    return render(request, "chat/rooms.html", {"rooms": visible, "form": form, "existing": existing})


def _readable_room(request: HttpRequest, slug: str):
    try:
        return selectors.room_for_user(slug=slug, user=request.user)
    except (selectors.RoomNotFound, selectors.RoomAccessDenied):
        # A private room the user is not in is answered like a missing one: its
        # existence is not the user's to know.
        raise Http404("No such room.") from None


@login_required
def room(request: HttpRequest, slug: str) -> HttpResponse:
    chat_room = _readable_room(request, slug)
    config = {
        "room": chat_room.slug,
        "user": request.user.get_username(),
        "maxChars": settings.CHAT_MAX_MESSAGE_CHARS,
        "pageSize": settings.CHAT_HISTORY_PAGE,
    }
    return render(request, "chat/room.html", {"room": chat_room, "config": config})


def _int_param(request: HttpRequest, name: str) -> int | None:
    value = request.GET.get(name)
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer") from None
    if number < 0:
        raise ValueError(f"{name} must not be negative")
    return number


@require_GET
def room_messages(request: HttpRequest, slug: str) -> JsonResponse:
    if not request.user.is_authenticated:
        return JsonResponse({"error": "authentication required"}, status=401)
    chat_room = _readable_room(request, slug)
    try:
        before = _int_param(request, "before")
        after = _int_param(request, "after")
        limit = _int_param(request, "limit") or settings.CHAT_HISTORY_PAGE
    except ValueError as error:
        return JsonResponse({"error": str(error)}, status=400)
    if before is not None and after is not None:
        return JsonResponse({"error": "give before or after, not both"}, status=400)
    limit = min(limit, HISTORY_MAX_LIMIT)
    messages, has_more = selectors.messages_page(room=chat_room, before=before, after=after, limit=limit)
    return JsonResponse({"messages": [protocol.message_frame(m) for m in messages], "has_more": has_more})
