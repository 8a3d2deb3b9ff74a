"""SQL that dx installs: its own tables in schema ``dx`` and the per-table capture triggers.

Ordering: every capturing transaction inserts one row (its first outbox row, flagged
``marks_txn``, or a ``dx.txn_marker`` row) whose *deferred* constraint trigger runs at commit
time, takes a shared advisory lock and draws ``dx.commit_seq``. Two transactions that touch the
same row are serialised by the row lock, so the later one always draws the higher
number: ordering by that number keeps per-key order, which ordering by xid does not (a
transaction can hold an older xid yet overwrite a row after a younger one committed). The relay's
``dx.commit_frontier()`` reads the sequence and then waits (watching ``pg_locks``, never queueing
for the lock) for the transactions that hold the shared lock at that instant. Afterwards every
number at or below the frontier belongs to a finished transaction: nothing committed is skipped,
and no heuristic wait is involved. A long-open transaction delays only its own changes.
"""

from __future__ import annotations

import secrets

from psycopg import sql

from pipeline.capture.spec import ColumnSpec, TableSpec

#: advisory lock key (two-int4 form) shared by committers and taken exclusively by the relay.
COMMIT_LOCK = (0x6478, 1)
#: advisory lock class of dx's own coordination locks: (class, 0) serialises schema installs,
#: LEASE_KEY is the relay lease. Advisory locks are per database, so one relay is active per
#: outbox whatever its name (two names must not both publish and delete the same rows).
LEASE_LOCK_CLASS = 0x6478 + 1
LEASE_KEY = (LEASE_LOCK_CLASS, 1)
NOTIFY_CHANNEL = "dx_outbox"
MARK_GUC = "dx.txn_marked"
SEQ_GUC = "dx.txn_sequenced"
ORIGIN_GUC = "dx.origin"
#: "<outbox id>|<entity>:<key>" of the last row deleted from a partition in this transaction:
#: a partition move's INSERT (same key) turns that delete into an update
MOVE_GUC = "dx.moved_from"

# Types without a btree equality: compared through their text form.
_NO_EQUALITY = {"json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle"}

# Only module constants are interpolated into these two texts, never configuration.
BASE_DDL = f"""
CREATE SCHEMA IF NOT EXISTS dx;
CREATE SEQUENCE IF NOT EXISTS dx.commit_seq AS bigint CACHE 1;
CREATE TABLE IF NOT EXISTS dx.outbox (
    id bigint GENERATED ALWAYS AS IDENTITY (CACHE 100),
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    entity text NOT NULL,
    version integer NOT NULL DEFAULT 0,
    op "char" NOT NULL,
    key jsonb,
    before jsonb,
    after jsonb,
    origin text,
    event_id uuid DEFAULT gen_random_uuid(),
    event_type text,
    created_at timestamptz NOT NULL DEFAULT now(),
    marks_txn boolean,
    PRIMARY KEY (xid, id)
);
ALTER TABLE dx.outbox ADD COLUMN IF NOT EXISTS marks_txn boolean;
-- stored with the change, so it stays the same through relay retries and never repeats after a
-- restore or fail-over (ids derived from xid and outbox id could)
ALTER TABLE dx.outbox ALTER COLUMN event_id SET DEFAULT gen_random_uuid();
CREATE TABLE IF NOT EXISTS dx.txn_marker (
    xid xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE TABLE IF NOT EXISTS dx.txn (
    seq bigint PRIMARY KEY,
    xid xid8 NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS dx.outbox_quarantine (
    seq bigint NOT NULL,
    id bigint NOT NULL,
    xid xid8 NOT NULL,
    entity text NOT NULL,
    version integer NOT NULL,
    op "char" NOT NULL,
    key jsonb,
    before jsonb,
    after jsonb,
    origin text,
    event_id uuid,
    event_type text,
    created_at timestamptz NOT NULL,
    reason text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (seq, id)
);
CREATE TABLE IF NOT EXISTS dx.capture_spec (
    entity text NOT NULL,
    version integer NOT NULL,
    spec jsonb NOT NULL,
    fingerprint text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entity, version)
);
CREATE TABLE IF NOT EXISTS dx.relay_state (
    name text PRIMARY KEY,
    seq bigint NOT NULL,
    id bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- which database recorded the cursor (pipeline.relay.identity): tells a restored, copied or
-- promoted database from the one the relay published from
ALTER TABLE dx.relay_state ADD COLUMN IF NOT EXISTS identity text;
-- the active relay's renewed lease (pipeline.relay.lease): lets a standby take over from a
-- frozen or cut-off holder whose session (and advisory lock) PostgreSQL still keeps
CREATE TABLE IF NOT EXISTS dx.relay_lease (
    id integer PRIMARY KEY CHECK (id = 1),
    holder text NOT NULL,
    backend_pid integer NOT NULL,
    renewed_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS dx.snapshot_progress (
    entity text PRIMARY KEY,
    last_key jsonb,
    rows bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
DROP FUNCTION IF EXISTS dx.commit_frontier();
CREATE OR REPLACE FUNCTION dx.commit_frontier(max_wait_ms integer DEFAULT 200) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    frontier bigint;
    committing text[];
    deadline timestamptz := clock_timestamp() + make_interval(secs => max_wait_ms / 1000.0);
BEGIN
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO frontier FROM dx.commit_seq;
    -- every number at or below it was drawn by a transaction holding the shared commit lock
    -- until it ends: wait for the ones holding it now, by watching, never by queueing for the
    -- lock (an exclusive request would make every later committer queue behind it while a
    -- transaction that drew its number early stays open)
    LOOP
        SELECT array_agg(l.virtualtransaction) INTO committing FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.classid = {COMMIT_LOCK[0]}
          AND l.objid = {COMMIT_LOCK[1]} AND l.objsubid = 2 AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND (committing IS NULL OR l.virtualtransaction = ANY (committing));
        IF committing IS NULL THEN
            RETURN frontier;
        END IF;
        IF clock_timestamp() > deadline THEN
            RETURN NULL;  -- still committing (or drew its number early): try again later
        END IF;
        PERFORM pg_sleep(0.001);
    END LOOP;
END $$;
CREATE OR REPLACE FUNCTION dx.mark_txn() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('{SEQ_GUC}', true) = '1' THEN
        RAISE EXCEPTION 'dx: this transaction already drew its commit number; changes '
                        'captured after it could be published out of order'
            USING HINT = 'SET CONSTRAINTS ALL IMMEDIATE (or a deferred trigger) ran dx''s '
                         'commit trigger early: capture before it, or name constraints '
                         'instead of ALL';
    END IF;
    IF current_setting('{MARK_GUC}', true) IS DISTINCT FROM '1' THEN
        INSERT INTO dx.txn_marker DEFAULT VALUES;
        PERFORM set_config('{MARK_GUC}', '1', true);
    END IF;
END $$;
CREATE OR REPLACE FUNCTION dx.publish(aggregatetype text, aggregateid text, type text,
                                      payload jsonb, event_id uuid DEFAULT gen_random_uuid())
RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN
    IF aggregatetype !~ '^[A-Za-z0-9._-]{{1,200}}$' THEN
        RAISE EXCEPTION 'dx: aggregatetype % cannot name a Kafka topic',
            quote_literal(aggregatetype)
            USING HINT = 'use letters, digits, ".", "_" and "-"';
    END IF;
    IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'dx_capture') THEN
        -- logical capture: a transactional message in the change stream, nothing to purge
        PERFORM pg_logical_emit_message(true, 'dx.outbox', jsonb_build_object(
            'aggregatetype', aggregatetype, 'aggregateid', aggregateid, 'type', type,
            'payload', payload, 'event_id', event_id,
            'origin', NULLIF(current_setting('{ORIGIN_GUC}', true), ''))::text);
        RETURN event_id;
    END IF;
    PERFORM dx.mark_txn();
    INSERT INTO dx.outbox (entity, op, key, after, origin, event_id, event_type)
    VALUES (aggregatetype, 'e', to_jsonb(aggregateid), payload,
            NULLIF(current_setting('{ORIGIN_GUC}', true), ''), event_id, type);
    RETURN event_id;
END $$;
CREATE OR REPLACE FUNCTION dx.refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'dx: TRUNCATE of captured table %.% would not reach Kafka',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING HINT = 'use DELETE, or run "dx capture uninstall" first';
END $$;
"""  # noqa: S608


def on_commit_ddl(notify: bool) -> str:
    """The commit-time trigger; NOTIFY is optional because it serialises committers."""
    note = f"PERFORM pg_notify('{NOTIFY_CHANNEL}', '');" if notify else ""
    return f"""
CREATE OR REPLACE FUNCTION dx.on_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('{SEQ_GUC}', true) IS DISTINCT FROM '1' THEN
        PERFORM pg_advisory_xact_lock_shared({COMMIT_LOCK[0]}, {COMMIT_LOCK[1]});
        INSERT INTO dx.txn (seq, xid) VALUES (nextval('dx.commit_seq'), pg_current_xact_id());
        PERFORM set_config('{SEQ_GUC}', '1', true);
        {note}
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS dx_on_commit ON dx.txn_marker;
CREATE CONSTRAINT TRIGGER dx_on_commit AFTER INSERT ON dx.txn_marker
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION dx.on_commit();
DROP TRIGGER IF EXISTS dx_on_commit ON dx.outbox;
CREATE CONSTRAINT TRIGGER dx_on_commit AFTER INSERT ON dx.outbox
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.marks_txn)
    EXECUTE FUNCTION dx.on_commit();
-- captured under session_replication_role = replica too (see ENABLE_ALWAYS)
ALTER TABLE dx.txn_marker ENABLE ALWAYS TRIGGER dx_on_commit;
ALTER TABLE dx.outbox ENABLE ALWAYS TRIGGER dx_on_commit;
"""  # noqa: S608


# --- per-table capture ----------------------------------------------------------------------

ROW_TRIGGERS = ("dx_capture", "dx_capture_update")
STATEMENT_TRIGGERS = ("dx_capture_insert_stmt", "dx_capture_update_stmt",
                      "dx_capture_delete_stmt")
TRIGGER_NAMES = (*ROW_TRIGGERS, *STATEMENT_TRIGGERS, "dx_refuse_truncate")
#: Why every dx trigger is ENABLE ALWAYS: PostgreSQL's default ('O', origin) does not fire in
#: sessions with ``session_replication_role = replica`` (pg_restore, ETL and replication tools
#: set it to skip triggers and foreign keys), so their writes would change the table and never
#: reach the outbox. ALWAYS captures them like any other write; :data:`INACTIVE_TRIGGERS` finds
#: a trigger someone disabled or set back.
ENABLE_ALWAYS = "A"
#: dx's triggers in this database that do not fire always: (schema, table, trigger, tgenabled)
INACTIVE_TRIGGERS = """
SELECT n.nspname, c.relname, t.tgname, t.tgenabled::text
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.tgname IN ('dx_on_commit', 'dx_capture', 'dx_capture_update', 'dx_capture_insert_stmt',
                   'dx_capture_update_stmt', 'dx_capture_delete_stmt', 'dx_refuse_truncate')
  AND t.tgenabled <> 'A' AND NOT t.tgisinternal
ORDER BY 1, 2, 3
"""


def function_name(spec: TableSpec) -> sql.Composable:
    name = f"capture {spec.schema}.{spec.table}"
    if len(name.encode()) > 60:
        name = "capture " + spec.fingerprint()[:24]
    return sql.Identifier("dx", name)


def _json_object(cols: tuple[ColumnSpec, ...], alias: str) -> sql.Composable:
    """jsonb_build_object over the columns, in chunks of 50 (the function's 100-argument cap)."""
    parts: list[sql.Composable] = []
    for i in range(0, len(cols), 50):
        args = sql.SQL(", ").join(
            sql.SQL("{}, {}.{}").format(sql.Literal(c.name), sql.SQL(alias),
                                        sql.Identifier(c.name))
            for c in cols[i:i + 50]
        )
        parts.append(sql.SQL("jsonb_build_object({})").format(args))
    return sql.SQL(" || ").join(parts)


def _comparable(cols: tuple[ColumnSpec, ...], alias: str) -> sql.Composable:
    items = []
    for c in cols:
        ref = sql.SQL("{}.{}").format(sql.SQL(alias), sql.Identifier(c.name))
        items.append(sql.SQL("{}::text").format(ref) if c.type in _NO_EQUALITY else ref)
    return sql.SQL("ROW({})").format(sql.SQL(", ").join(items))


def _origin() -> sql.Composable:
    return sql.SQL("NULLIF(current_setting({}, true), '')").format(sql.Literal(ORIGIN_GUC))


def _dollar(body: str) -> str:
    tag = "$dx" + secrets.token_hex(4) + "$"
    assert tag not in body
    return f"{tag}{body}{tag}"


def row_function(spec: TableSpec, version: int) -> sql.Composable:
    k, cols = spec.key_columns, spec.columns
    ent, ver = sql.Literal(spec.entity), sql.Literal(version)
    ins = sql.SQL("INSERT INTO dx.outbox (entity, version, op, key, before, after, origin, "
                  "marks_txn) VALUES ")
    # The first row a transaction captures carries marks_txn = true: its deferred constraint
    # trigger draws the commit sequence, with no separate marker row to write and purge.
    body = sql.SQL("""
DECLARE marks boolean; moved text; moved_id bigint;
BEGIN
    IF current_setting({guc}, true) IS DISTINCT FROM '1' THEN
        PERFORM set_config({guc}, '1', true);
        marks := true;
    ELSIF current_setting({seq_guc}, true) = '1' THEN
        PERFORM dx.mark_txn();  -- raises: the commit number was drawn early
    END IF;
    IF TG_OP = 'INSERT' THEN
        -- an UPDATE that moved the row to another partition reaches us as DELETE + INSERT;
        -- with the key unchanged it is an update (or nothing, if no exposed column changed)
        moved := current_setting({move_guc}, true);
        IF moved IS NOT NULL AND moved <> '' THEN
            PERFORM set_config({move_guc}, '', true);
            IF substr(moved, strpos(moved, '|') + 1) = {ent} || ':' || ({key_new})::text THEN
                moved_id := split_part(moved, '|', 1)::bigint;
                DELETE FROM dx.outbox WHERE xid = pg_current_xact_id() AND id = moved_id
                    AND before = {row_new};
                IF NOT FOUND THEN
                    UPDATE dx.outbox SET op = 'u', after = {row_new}
                    WHERE xid = pg_current_xact_id() AND id = moved_id;
                END IF;
                RETURN NULL;
            END IF;
        END IF;
        {ins}({ent}, {ver}, 'c', {key_new}, NULL, {row_new}, {origin}, marks);
    ELSIF TG_OP = 'DELETE' THEN
        {ins}({ent}, {ver}, 'd', {key_old}, {row_old}, NULL, {origin}, marks)
            RETURNING id INTO moved_id;
        IF {partitioned} THEN  -- the INSERT of a partition move, if one follows, finds it
            PERFORM set_config({move_guc}, moved_id || '|' || {ent} || ':' || ({key_old})::text,
                               true);
        END IF;
    ELSIF {cmp_key_old} IS DISTINCT FROM {cmp_key_new} THEN
        {ins}({ent}, {ver}, 'd', {key_old}, {row_old}, NULL, {origin}, marks),
             ({ent}, {ver}, 'c', {key_new}, NULL, {row_new}, {origin}, NULL);
    ELSE
        {ins}({ent}, {ver}, 'u', {key_new}, {row_old}, {row_new}, {origin}, marks);
    END IF;
    RETURN NULL;
END
""").format(
        guc=sql.Literal(MARK_GUC), seq_guc=sql.Literal(SEQ_GUC), ins=ins, ent=ent, ver=ver,
        move_guc=sql.Literal(MOVE_GUC),
        partitioned=sql.SQL("(TG_TABLE_SCHEMA, TG_TABLE_NAME) <> ({}, {})").format(
            sql.Literal(spec.schema), sql.Literal(spec.table)),
        origin=_origin(),
        key_new=_json_object(k, "NEW"), key_old=_json_object(k, "OLD"),
        row_new=_json_object(cols, "NEW"), row_old=_json_object(cols, "OLD"),
        cmp_key_old=_comparable(k, "OLD"), cmp_key_new=_comparable(k, "NEW"),
    )
    return body


def statement_function(spec: TableSpec, version: int) -> sql.Composable:
    k, cols = spec.key_columns, spec.columns
    ent, ver = sql.Literal(spec.entity), sql.Literal(version)
    col_list = sql.SQL(", ").join(sql.Identifier(c.name) for c in cols)
    join_on = sql.SQL(" AND ").join(
        sql.SQL("o.{c} = n.{c}").format(c=sql.Identifier(c.name)) for c in k)
    here = sql.Identifier("?dx")
    body = sql.SQL("""
DECLARE n_rows bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO dx.outbox (entity, version, op, key, after, origin)
        SELECT {ent}, {ver}, 'c', {key_n}, {row_n}, {origin} FROM new_rows n;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO dx.outbox (entity, version, op, key, before, origin)
        SELECT {ent}, {ver}, 'd', {key_o}, {row_o}, {origin} FROM old_rows o;
    ELSE
        INSERT INTO dx.outbox (entity, version, op, key, before, after, origin)
        SELECT {ent}, {ver},
               CASE WHEN o.{here} IS NULL THEN 'c' WHEN n.{here} IS NULL THEN 'd' ELSE 'u' END,
               CASE WHEN n.{here} IS NULL THEN {key_o} ELSE {key_n} END,
               CASE WHEN o.{here} IS NULL THEN NULL ELSE {row_o} END,
               CASE WHEN n.{here} IS NULL THEN NULL ELSE {row_n} END,
               {origin}
        FROM (SELECT 1 AS {here}, {cols} FROM old_rows) o
        FULL JOIN (SELECT 1 AS {here}, {cols} FROM new_rows) n ON {join_on}
        WHERE o.{here} IS NULL OR n.{here} IS NULL OR {cmp_o} IS DISTINCT FROM {cmp_n};
    END IF;
    GET DIAGNOSTICS n_rows = ROW_COUNT;
    IF n_rows > 0 THEN
        PERFORM dx.mark_txn();
    END IF;
    RETURN NULL;
END
""").format(
        ent=ent, ver=ver, origin=_origin(), here=here, cols=col_list, join_on=join_on,
        key_n=_json_object(k, "n"), key_o=_json_object(k, "o"),
        row_n=_json_object(cols, "n"), row_o=_json_object(cols, "o"),
        cmp_o=_comparable(cols, "o"), cmp_n=_comparable(cols, "n"),
    )
    return body


def install_statements(spec: TableSpec, version: int, mode: str, body_text: str,
                       partitions: tuple[tuple[str, str], ...] = ()) -> list[sql.Composed]:
    """DDL that (re)installs capture on one table; run it in one transaction.

    ``partitions`` (schema, name) are the partitions below a partitioned table: PostgreSQL
    clones its row triggers to them, but not the TRUNCATE guard, which each gets here."""
    table = sql.Identifier(spec.schema, spec.table)
    fn = function_name(spec)
    stmts: list[sql.Composed] = [
        sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(
            fn, sql.SQL(_dollar(body_text))),
    ]
    stmts += drop_triggers(spec, partitions)
    if mode == "row":
        changed = sql.SQL("{} IS DISTINCT FROM {}").format(
            _comparable(spec.columns, "OLD"), _comparable(spec.columns, "NEW"))
        stmts += [
            sql.SQL("CREATE TRIGGER dx_capture AFTER INSERT OR DELETE ON {} "
                    "FOR EACH ROW EXECUTE FUNCTION {}()").format(table, fn),
            sql.SQL("CREATE TRIGGER dx_capture_update AFTER UPDATE ON {} FOR EACH ROW "
                    "WHEN ({}) EXECUTE FUNCTION {}()").format(table, changed, fn),
        ]
    else:
        stmts += [
            sql.SQL("CREATE TRIGGER dx_capture_insert_stmt AFTER INSERT ON {} "
                    "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
                    "EXECUTE FUNCTION {}()").format(table, fn),
            sql.SQL("CREATE TRIGGER dx_capture_update_stmt AFTER UPDATE ON {} "
                    "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
                    "FOR EACH STATEMENT EXECUTE FUNCTION {}()").format(table, fn),
            sql.SQL("CREATE TRIGGER dx_capture_delete_stmt AFTER DELETE ON {} "
                    "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
                    "EXECUTE FUNCTION {}()").format(table, fn),
        ]
    # ENABLE_ALWAYS; a partitioned table's row triggers recurse to their clones
    capture = ROW_TRIGGERS if mode == "row" else STATEMENT_TRIGGERS
    stmts += [sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(table, sql.Identifier(n))
              for n in capture]
    return stmts + truncate_guards(spec, partitions)


def truncate_guards(spec: TableSpec,
                    partitions: tuple[tuple[str, str], ...] = ()) -> list[sql.Composed]:
    """The TRUNCATE guard on the table and each partition (a TRUNCATE reaches no capture),
    firing ALWAYS (see ENABLE_ALWAYS)."""
    guarded = [sql.Identifier(spec.schema, spec.table),
               *(sql.Identifier(*p) for p in partitions)]
    return [sql.SQL("CREATE TRIGGER dx_refuse_truncate BEFORE TRUNCATE ON {} "
                    "FOR EACH STATEMENT EXECUTE FUNCTION dx.refuse_truncate()").format(t)
            for t in guarded] + [
        sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER dx_refuse_truncate").format(t)
        for t in guarded]


def drop_triggers(spec: TableSpec,
                  partitions: tuple[tuple[str, str], ...] = ()) -> list[sql.Composed]:
    """Drop capture from the table, and the TRUNCATE guard from its ``partitions``."""
    table = sql.Identifier(spec.schema, spec.table)
    return [sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name), table)
            for name in TRIGGER_NAMES] + [
        sql.SQL("DROP TRIGGER IF EXISTS dx_refuse_truncate ON {}").format(sql.Identifier(*p))
        for p in partitions]
