"""Django admin "Dead letters": browse, search, inspect, replay and discard; plus the broker status page.

Replay and discard act on the selection, or on everything the current filter matches (Django's
"Select all N" link sets select_across; the action then receives the whole filtered queryset).
Both go through a confirmation page showing how many letters are concerned; the services log
every action with who did it (audit row and admin LogEntry).
"""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.html import format_html, format_html_join

from deadletters import selectors
from deadletters.models import DeadLetter, DeadLetterAction
from deadletters.services.resolution import BulkResult, dead_letter_discard, dead_letter_replay

CONFIRMATION_SAMPLE = 20


class DeadLetterActionInline(admin.TabularInline):
    model = DeadLetterAction
    extra = 0
    can_delete = False
    fields = ["created_at", "kind", "actor_label"]
    readonly_fields = fields
    verbose_name = "action"
    verbose_name_plural = "Replays and discards"

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "origin_queue",
        "reason",
        "task_name",
        "error",
        "death_count",
        "first_death_at",
        "last_death_at",
        "status",
        "replay_count",
    ]
    list_display_links = ["id", "error"]
    list_filter = ["origin_queue", "reason", "task_name", "status", "last_death_at"]
    date_hierarchy = "last_death_at"
    search_fields = ["body", "error_message", "error_class", "task_id", "=message_id"]
    list_per_page = 50
    show_full_result_count = True
    actions = ["replay_dead_letters", "discard_dead_letters"]
    inlines = [DeadLetterActionInline]
    change_list_template = "admin/deadletters/deadletter/change_list.html"
    fieldsets = [
        (
            "What failed, and why",
            {
                "fields": [
                    "status",
                    "replay_count",
                    "last_replayed_at",
                    "origin_queue",
                    "origin_exchange",
                    "routing_key",
                    "reason",
                    "task_name",
                    "task_id",
                    "error_class",
                    "error_message",
                    "attempts",
                    "death_count",
                    "first_death_at",
                    "last_death_at",
                    "archived_at",
                ]
            },
        ),
        ("Traceback", {"fields": ["traceback_pre"]}),
        ("x-death history", {"fields": ["x_death_table"]}),
        ("Payload", {"fields": ["payload_pre"]}),
        (
            "Headers and properties",
            {"fields": ["headers_pre", "properties_pre", "message_id", "fingerprint"]},
        ),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: object = None) -> list[str]:
        return [name for _, options in self.fieldsets for name in options["fields"]]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # The detail page is read-only; "change" is the permission the actions need.
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # Letters are discarded (kept, audited), never deleted from the admin.
        return False

    @admin.display(description="error", ordering="error_class")
    def error(self, obj: DeadLetter) -> str:
        text = (
            f"{obj.error_class.rpartition('.')[2]}: {obj.error_message}"
            if obj.error_class
            else obj.error_message
        )
        return (text[:80] + "…") if len(text) > 80 else (text or "-")

    @admin.display(description="traceback")
    def traceback_pre(self, obj: DeadLetter) -> str:
        return format_html("<pre class='dlq-pre'>{}</pre>", obj.traceback or "(none: this message never ran)")

    @admin.display(description="payload")
    def payload_pre(self, obj: DeadLetter) -> str:
        return _pre_json(selectors.dead_letter_payload(obj))

    @admin.display(description="headers")
    def headers_pre(self, obj: DeadLetter) -> str:
        return _pre_json(obj.headers)

    @admin.display(description="properties")
    def properties_pre(self, obj: DeadLetter) -> str:
        return _pre_json(obj.properties)

    @admin.display(description="x-death (most recent first)")
    def x_death_table(self, obj: DeadLetter) -> str:
        if not obj.x_death:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    entry.get("time", ""),
                    entry.get("queue", ""),
                    entry.get("reason", ""),
                    entry.get("count", ""),
                    entry.get("exchange", ""),
                    ", ".join(entry.get("routing-keys") or []),
                )
                for entry in obj.x_death
            ),
        )
        return format_html(
            "<table><thead><tr><th>time</th><th>queue</th><th>reason</th><th>count</th><th>exchange</th>"
            "<th>routing keys</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    # --- actions ---------------------------------------------------------------------------

    @admin.action(description="Replay selected dead letters", permissions=["change"])
    def replay_dead_letters(
        self, request: HttpRequest, queryset: QuerySet[DeadLetter]
    ) -> HttpResponse | None:
        if not request.POST.get("confirm"):
            return self._confirmation(request, queryset, verb="replay")
        result = dead_letter_replay(dead_letters=queryset.iterator(), actor=request.user)
        self._report(request, result, "replayed")
        return None

    @admin.action(description="Discard selected dead letters", permissions=["change"])
    def discard_dead_letters(
        self, request: HttpRequest, queryset: QuerySet[DeadLetter]
    ) -> HttpResponse | None:
        if not request.POST.get("confirm"):
            return self._confirmation(request, queryset, verb="discard")
        result = dead_letter_discard(dead_letters=queryset.iterator(), actor=request.user)
        self._report(request, result, "discarded")
        return None

    def _confirmation(
        self, request: HttpRequest, queryset: QuerySet[DeadLetter], *, verb: str
    ) -> TemplateResponse:
        count = queryset.count()
        context = {
            **self.admin_site.each_context(request),
            "title": f"{verb.capitalize()} {count} dead letter{'s' if count != 1 else ''}?",
            "opts": self.model._meta,
            "verb": verb,
            "count": count,
            "sample": queryset[:CONFIRMATION_SAMPLE],
            "select_across": request.POST.get("select_across", "0"),
            "selected": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "action": request.POST.get("action"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "filters": request.GET.urlencode(),
        }
        return TemplateResponse(request, "admin/deadletters/deadletter/action_confirmation.html", context)

    def _report(self, request: HttpRequest, result: BulkResult, past: str) -> None:
        through = f" Published through RabbitMQ node {result.node}." if result.node else ""
        self.message_user(request, f"{len(result.done)} dead letters {past}.{through}", messages.SUCCESS)
        for pk, error in list(result.failed.items())[:10]:
            self.message_user(request, f"Dead letter #{pk} was not {past}: {error}", messages.ERROR)
        if len(result.failed) > 10:
            self.message_user(request, f"… and {len(result.failed) - 10} more failed.", messages.ERROR)

    # --- broker status ---------------------------------------------------------------------

    def get_urls(self):
        return [
            path(
                "broker/",
                self.admin_site.admin_view(self.broker_status_view),
                name="deadletters_broker_status",
            ),
            *super().get_urls(),
        ]

    def broker_status_view(self, request: HttpRequest) -> TemplateResponse:
        """Each broker node and each queue's depth, rates and place on a cluster: for staff who may
        view dead letters, like the letters themselves."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": "Broker status",
            "opts": self.model._meta,
            "nodes": selectors.broker_node_statuses(),
            "queues": selectors.queue_statuses(),
        }
        return TemplateResponse(request, "admin/deadletters/deadletter/broker_status.html", context)


def _pre_json(value: object) -> str:
    return format_html(
        "<pre class='dlq-pre'>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False, default=str)
    )
