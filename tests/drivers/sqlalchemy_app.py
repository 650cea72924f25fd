"""SQLAlchemy 1.4 (ORM over psycopg2) through pgveil: a small CRM model whose list, detail,
search and export views run unchanged. Declarative classes map the fixture's customers,
contacts, deals and tasks with relationships; the views use ORM queries (2.0-style
select() and legacy Query), Core select() on the tables, text(), bound parameters of
several types (int, str, Decimal, date, a list for IN, bool), count(), limit/offset
pages, Session.get, lazy loads, joinedload (a masked table inside a LIMITed subquery) and
selectinload, a streamed export (yield_per and stream_results, a server-side cursor:
DECLARE and FETCH) written with the csv module, and a rolled-back unit of work (a
multi-row INSERT ... RETURNING, an UPDATE of masked columns, refresh). One line per
result; nothing nondeterministic is printed (no created_at, task due dates or new ids).

For a masked role, predicates and aggregates on phone and email compare masked values,
so the search for one clear phone finds nothing and every e-mail counts as one.

    python3 sqlalchemy_app.py DSN    # postgresql://USER:PW@HOST:PORT/crm?sslmode=disable
"""
import csv
import io
import sys
from datetime import date
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Numeric,
    Text,
    bindparam,
    create_engine,
    func,
    select,
    text,
)
from sqlalchemy.orm import Session, declarative_base, joinedload, relationship, selectinload

Base = declarative_base()


class Customer(Base):
    __tablename__ = "customers"
    id = Column(BigInteger, primary_key=True)
    full_name = Column(Text, nullable=False)
    phone = Column(Text)
    email = Column(Text)
    birth_date = Column(Date)
    balance = Column(Numeric(12, 2), nullable=False)
    created_at = Column(DateTime(timezone=True))
    contacts = relationship("Contact", back_populates="customer", order_by="Contact.id")
    deals = relationship("Deal", back_populates="customer", order_by="Deal.id")
    tasks = relationship("Task", back_populates="customer", order_by="Task.id")


class Contact(Base):
    __tablename__ = "contacts"
    id = Column(BigInteger, primary_key=True)
    customer_id = Column(BigInteger, ForeignKey("customers.id"), nullable=False)
    kind = Column(Text, nullable=False)
    value = Column(Text, nullable=False)
    customer = relationship("Customer", back_populates="contacts")


class Deal(Base):
    __tablename__ = "deals"
    id = Column(BigInteger, primary_key=True)
    customer_id = Column(BigInteger, ForeignKey("customers.id"), nullable=False)
    title = Column(Text, nullable=False)
    amount = Column(Numeric(12, 2), nullable=False)
    stage = Column(Text, nullable=False)
    customer = relationship("Customer", back_populates="deals")


class Task(Base):
    __tablename__ = "tasks"
    id = Column(BigInteger, primary_key=True)
    customer_id = Column(BigInteger, ForeignKey("customers.id"))
    owner = Column(Text, nullable=False)
    note = Column(Text)
    due = Column(Date)
    customer = relationship("Customer", back_populates="tasks")


customers = Customer.__table__
deals = Deal.__table__


def out(label, *values):
    print(label + ":", " ".join(str(v) for v in values))


def card(c):
    return f"[{c.id}|{c.full_name}|{c.phone}|{c.email}|{c.birth_date}|{c.balance}]"


def list_view(session, page, per_page=5):
    """A customer list page, as GET /customers?page=N renders it."""
    total = session.scalar(select(func.count()).select_from(Customer))
    rows = session.scalars(
        select(Customer).order_by(Customer.id).limit(per_page).offset((page - 1) * per_page)
    ).all()
    out(f"list page {page} of {-(-total // per_page)}", *(card(c) for c in rows))


def legacy_list_view(session, page, per_page=4):
    """The same page through the legacy Query API (its count() wraps the query)."""
    q = session.query(Customer).filter(Customer.id <= 50).order_by(Customer.id)
    rows = q.limit(per_page).offset((page - 1) * per_page).all()
    out(f"legacy list page {page}, count {q.count()}", *(card(c) for c in rows))


def detail_view(session, customer_id):
    """A customer page: the row, then its relationships loaded lazily."""
    c = session.get(Customer, customer_id)
    out(f"detail {customer_id}", card(c))
    out(f"detail {customer_id} contacts", *(f"[{x.kind}|{x.value}]" for x in c.contacts))
    out(f"detail {customer_id} deals", *(f"[{d.title}|{d.amount}|{d.stage}]" for d in c.deals))
    out(f"detail {customer_id} tasks", *(f"[{t.owner}|{t.note}]" for t in c.tasks))


def task_detail_view(session, task_id):
    """A task page: its customer through a lazy many-to-one."""
    t = session.get(Task, task_id)
    out(f"task {task_id}", f"[{t.owner}|{t.note}]", "customer", card(t.customer))


def eager_views(session):
    """Lists with their relationships loaded eagerly."""
    rows = (
        session.execute(
            select(Customer)
            .options(joinedload(Customer.contacts))
            .where(Customer.id.in_([3, 5, 7]))
            .order_by(Customer.id)
        )
        .unique()
        .scalars()
        .all()
    )
    out("joinedload contacts", *(card(c) + str([x.value for x in c.contacts]) for c in rows))
    # joinedload with a LIMIT: SQLAlchemy wraps the customers in a subquery and joins to it.
    rows = (
        session.query(Customer)
        .options(joinedload(Customer.deals))
        .order_by(Customer.id)
        .offset(10)
        .limit(3)
        .all()
    )
    out("joinedload deals, limited", *(card(c) + str([d.title for d in c.deals]) for c in rows))
    rows = session.scalars(
        select(Customer)
        .options(selectinload(Customer.deals), selectinload(Customer.tasks))
        .where(Customer.id.between(20, 23))
        .order_by(Customer.id)
    ).all()
    for c in rows:
        out(
            f"selectinload {c.id}",
            card(c),
            [f"{d.title}/{d.stage}" for d in c.deals],
            [t.note for t in c.tasks],
        )
    deals_won = session.scalars(
        select(Deal)
        .options(joinedload(Deal.customer))
        .where(Deal.stage == "won", Deal.amount >= Decimal("49000"))
        .order_by(Deal.id)
    ).all()
    out("won deals with customer", *(f"[{d.title}|{d.amount}]" + card(d.customer) for d in deals_won))


def search_view(session):
    """The search box and filters of the list page."""
    pattern = "%customer 1_"
    found = session.scalars(
        select(Customer).where(Customer.full_name.ilike(pattern)).order_by(Customer.id)
    ).all()
    out("search name ilike", *(card(c) for c in found))
    found = session.scalars(
        select(Customer.id)
        .where(Customer.email.like("%@example.com"), Customer.id < 15)
        .order_by(Customer.id)
    ).all()
    out("search email like %@example.com", found)
    found = session.scalars(
        select(Customer.id).where(Customer.phone.like("139%"), Customer.id < 15).order_by(Customer.id)
    ).all()
    out("search phone like 139%", found)
    # An exact phone: a masked role compares the masked value, so it finds nothing.
    clear_phone = "139" + "1000" + "7919"
    found = session.scalars(select(Customer.id).where(Customer.phone == clear_phone)).all()
    out("search exact phone", found)
    found = session.scalars(
        select(Customer.id)
        .where(
            Customer.birth_date.between(date(1970, 1, 1), date(1970, 12, 31)),
            Customer.balance >= Decimal("3300.50"),
        )
        .order_by(Customer.birth_date, Customer.id)
    ).all()
    out("search born 1970, balance >= 3300.50", found)
    open_tasks = session.query(Task.id, Task.owner, Task.note).filter(
        Task.owner == "carol", Task.customer_id.in_([4, 5, 6, 7, 8]), Task.note.isnot(None)
    )
    out("search tasks", *(f"[{r.id}|{r.owner}|{r.note}]" for r in open_tasks.order_by(Task.id)))
    domains = session.execute(
        select(func.split_part(Customer.email, "@", 2).label("domain"), func.count())
        .group_by("domain")
        .order_by("domain")
    ).all()
    out("email domains", *(f"[{d}|{n}]" for d, n in domains))
    out("distinct emails", session.scalar(select(func.count(Customer.email.distinct()))))


def core_reports(engine):
    """Dashboard numbers with Core select() and text() on a plain Connection."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(deals.c.stage, func.count().label("n"), func.sum(deals.c.amount).label("total"))
            .where(deals.c.amount > bindparam("min_amount"))
            .group_by(deals.c.stage)
            .order_by(deals.c.stage),
            {"min_amount": Decimal("1000.00")},
        ).all()
        out("core deals by stage", *(f"[{r.stage}|{r.n}|{r.total}]" for r in rows))
        rows = conn.execute(
            select(customers.c.id, customers.c.phone, customers.c.email, deals.c.title)
            .join(deals, deals.c.customer_id == customers.c.id)
            .where(customers.c.id.in_(bindparam("ids", expanding=True)))
            .order_by(customers.c.id, deals.c.id),
            {"ids": [2, 4]},
        ).all()
        out("core join", *("[" + "|".join(str(v) for v in r) + "]" for r in rows))
        rows = conn.execute(
            text(
                "SELECT id, full_name, phone, :flag AS vip FROM customers "
                "WHERE id = ANY(:ids) AND full_name <> :name ORDER BY id"
            ),
            {"flag": True, "ids": [6, 8, 9], "name": "Customer 9"},
        ).all()
        out("core text", *("[" + "|".join(str(v) for v in r) + "]" for r in rows))


def export_view(engine, session):
    """CSV export, streamed from server-side cursors."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "full_name", "phone", "email", "balance"])
    stmt = (
        select(Customer)
        .where(Customer.id <= 12)
        .order_by(Customer.id)
        .execution_options(yield_per=5)
    )
    for c in session.scalars(stmt):
        w.writerow([c.id, c.full_name, c.phone, c.email, c.balance])
    session.rollback()
    for csv_line in buf.getvalue().splitlines():
        out("export orm", csv_line)

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, max_row_buffer=4).execute(
            select(customers.c.id, customers.c.phone, customers.c.email)
            .where(customers.c.id.between(bindparam("lo"), bindparam("hi")))
            .order_by(customers.c.id.desc()),
            {"lo": 190, "hi": 200},
        )
        for part in result.partitions(4):
            w.writerows(part)
            w.writerow(["--"])
    for csv_line in buf.getvalue().splitlines():
        out("export core", csv_line)


def write_view(session):
    """A form that adds tasks and edits the customer, then is abandoned (rolled back)."""
    c = session.get(Customer, 3)
    before = [t.note for t in c.tasks]
    session.add_all(
        [
            Task(owner="alice", note="Web form: call back", customer=c, due=date(2030, 1, 2)),
            Task(owner="alice", note="Web form: send quote", customer=c),
        ]
    )
    session.flush()
    out("write new tasks have ids", all(t.id is not None for t in c.tasks))
    after = session.scalars(
        select(Task.note).where(Task.customer_id == 3).order_by(Task.id)
    ).all()
    out("write tasks before", before, "after flush", after)
    c.full_name = "Customer 3 (edited)"
    c.phone = "13912345678"
    c.email = "new.address@example.com"
    session.flush()
    session.refresh(c)
    out("write refreshed", card(c))
    session.rollback()
    c = session.get(Customer, 3)
    n = session.scalar(select(func.count(Task.id)).where(Task.customer_id == 3))
    out("write rolled back", card(c), "tasks", n)


def main(dsn):
    url = "postgresql+psycopg2://" + dsn.split("://", 1)[1]
    engine = create_engine(url, future=True)
    with Session(engine, future=True) as session:
        list_view(session, 1)
        list_view(session, 2)
        legacy_list_view(session, 3)
        session.rollback()
        detail_view(session, 2)
        detail_view(session, 12)
        task_detail_view(session, 7)
        session.rollback()
        eager_views(session)
        session.rollback()
        search_view(session)
        session.rollback()
    core_reports(engine)
    with Session(engine, future=True) as session:
        export_view(engine, session)
    with Session(engine, future=True) as session:
        write_view(session)
    engine.dispose()


main(sys.argv[1])
