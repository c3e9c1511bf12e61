"""`cdp identity …`: explain a customer, work the review queue, split a wrong merge, train the model."""
from __future__ import annotations

import sys

import click
import orjson

from cdp import console
from cdp.commandline import UserError, local_user, open_view, settings


@click.group()
def identity() -> None:
    """Identity resolution: explanations, review queue, splits, model training."""


@identity.command()
@click.argument("customer_id")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def explain(customer_id: str, fmt: str) -> None:
    """Every source record of a customer and the rule or field-by-field score behind each link."""
    from projections.identity_views import describe_link, explain as explain_customer

    con = open_view(settings())
    picture = explain_customer(con, customer_id.replace("-", "").lower())
    if picture is None:
        raise UserError(f"no customer {customer_id}")
    if fmt == "json":
        sys.stdout.write(orjson.dumps(picture, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    console.render_rows(["source record", "linked by"],
                        [(s["record"], describe_link(s["linked_by"], s["evidence"])) for s in picture["sources"]],
                        "table", title=f"customer {picture['customer_id']}: source records")
    if picture["merges"]:
        console.render_rows(["absorbed customer", "merged by"],
                            [(m["absorbed_id"], describe_link(m["rule"], m["evidence"])) for m in picture["merges"]],
                            "table", title="merges")
    if picture["decisions"]:
        console.render_rows(["decision", "record", "other record", "detail"],
                            [(d["kind"], d["record"], d["other_record"] or "",
                              describe_link(d["kind"], d["evidence"])) for d in picture["decisions"]],
                            "table", title="decisions")


@identity.command()
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 100_000), help="Pairs to list.")
@click.option("--confirm", "confirm_id", metavar="REVIEW_ID", help="Record that the pair is one person (merges them).")
@click.option("--reject", "reject_id", metavar="REVIEW_ID", help="Record that the pair are different people.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def review(limit: int, confirm_id: str | None, reject_id: str | None, fmt: str) -> None:
    """List grey-zone pairs (between the review and match thresholds), or confirm/reject one."""
    from projections.identity_views import describe_link, review_pair, review_queue

    cfg = settings()
    if confirm_id and reject_id:
        raise click.UsageError("give --confirm or --reject, not both")
    chosen = confirm_id or reject_id
    con = open_view(cfg)
    if chosen is None:
        rows = review_queue(con, limit)
        con.close()
        if fmt == "json":
            sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        elif not rows:
            console.out.print("the review queue is empty")
        else:
            console.render_rows(
                ["review_id", "record", "other record", "probability", "evidence"],
                [(r["review_id"], r["record"], r["other_record"], r["probability"],
                  describe_link("score", orjson.loads(r["evidence"]) if r["evidence"] else None)) for r in rows],
                "table", title=f"review queue (top {len(rows)})")
        return
    pair = review_pair(con, chosen)
    con.close()
    if pair is None:
        raise UserError(f"no review {chosen!r}: see `cdp identity review`")
    from cdp.pipeline import Pipeline

    with Pipeline(cfg) as pipeline:
        try:
            if confirm_id is not None:
                customer = pipeline.app.confirm_match(pair[0], pair[1])
            else:
                customer = pipeline.app.reject_match(pair[0], pair[1])
        except ValueError as error:
            raise UserError(str(error)) from None
        pipeline.catch_up()
    verdict = "confirmed: merged into" if confirm_id else "rejected: kept apart, remembered for"
    console.out.print(f"review {chosen} {verdict} customer {customer}")


@identity.command()
@click.argument("customer_id")
@click.option("--source", "sources", multiple=True, metavar="UNIT:SOURCE_ID",
              help="Source record(s) to move out together (repeatable). Default: every record apart.")
@click.option("--reason", default="manual split", show_default=True, help="Why, for the record.")
def split(customer_id: str, sources: tuple[str, ...], reason: str) -> None:
    """Undo a wrong merge; the split is remembered, so the same evidence will not merge them again."""
    from cdp.pipeline import Pipeline

    for s in sources:
        if ":" not in s:
            raise click.BadParameter(f"expected UNIT:SOURCE_ID, got {s!r}", param_hint="--source")
    with Pipeline(settings()) as pipeline:
        try:
            decisions = pipeline.app.split(customer_id.replace("-", "").lower(), list(sources) or None, reason,
                                           actor=local_user())
        except ValueError as error:
            raise UserError(str(error)) from None
        pipeline.catch_up()
    for d in decisions:
        console.out.print(f"{', '.join(d.source_keys)} → new customer {d.new_customer_id} (from {d.customer_id})")


TRAIN_ATTEMPTS = 3


@identity.command()
@click.option("--seed", default=1, show_default=True, type=int, help="Sampling seed (same seed, same model).")
@click.option("--dry-run", is_flag=True, help="Print what re-resolution would change; write nothing.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(0, 100_000), help="Changes to list.")
def train(seed: int, dry_run: bool, limit: int) -> None:
    """Estimate the match model (Fellegi–Sunter m/u by EM) from the records in the store and
    re-resolve them with it: its merges and splits are appended as identity events."""
    from cdp.pipeline import Pipeline

    with Pipeline(settings(), project=not dry_run) as pipeline:
        outcome = None
        for _ in range(TRAIN_ATTEMPTS):  # asked for a model: another writer's model meanwhile means train again
            with console.progress_bar("re-resolving", len(pipeline.app.resolver.blocks)) as bar:
                try:
                    outcome = pipeline.app.retrain(seed=seed, dry_run=dry_run, progress=bar)
                except ValueError as error:
                    raise UserError(str(error)) from None
            if outcome is not None:
                break
        pipeline.catch_up()
    if outcome is None:
        raise UserError(f"other writers stored a new model while this one trained, {TRAIN_ATTEMPTS} times; "
                        "theirs is in use now (run `cdp identity train` again to train once more)")
    model, changes = outcome.model, outcome.plan
    console.out.print(f"model v{model.version} trained on {model.trained_on.get('records', 0):,} records "
                      f"({model.trained_on.get('blocked_pairs', 0):,} candidate pairs)"
                      + ("" if outcome.new_model else ": the same as the latest model"))
    console.render_rows(["comparison", "level weights (log2 m/u)"],
                        [(name, "  ".join(f"{label} {w:+.1f}" for label, w in zip(labels, weights)))
                         for name, labels, weights in model.describe()], "table", title="match weights")
    rows = [("merge", m.absorbed, m.survivor, m.link.rule) for m in changes.merges[:limit]]
    rows += [("split", s.customer_id, s.new_customer_id, ", ".join(s.source_keys)) for s in changes.splits[:limit]]
    if rows:
        console.render_rows(["change", "customer", "into / new customer", "why / records"], rows, "table",
                            title=f"re-resolution (first {limit} of each)")
    verdict = "would change (dry run, nothing written)" if dry_run else "applied"
    console.out.print(f"re-resolution {verdict}: {outcome.describe()}")
